"""spendgate.pricing: costs equal genai-prices' own (and its per-token fast path exactly), overrides,
unknown models, and model names normalised to genai-prices' ids."""

from __future__ import annotations

import logging
from decimal import Decimal

import genai_prices
import pytest
from genai_prices.data_snapshot import get_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.pricing import PriceOverride, Pricer
from spendgate.providers import BUILTIN_PROVIDERS
from spendgate.providers.wire import Usage

USAGE = Usage(input_tokens=12_345, output_tokens=678, cache_read_tokens=4_000, cache_write_tokens=1_000,
              reasoning_tokens=300)


@pytest.mark.parametrize(
    "provider, model, genai_id",
    [
        ("openai", "gpt-4o-mini", "openai"),
        ("openai", "gpt-4o-2024-08-06", "openai"),
        ("anthropic", "claude-sonnet-4-5-20250929", "anthropic"),
        ("anthropic", "claude-3-5-haiku-latest", "anthropic"),
        ("gemini", "gemini-2.5-flash", "google"),
        ("gemini", "gemini-2.5-pro", "google"),
        ("azure", "gpt-4o", "azure"),
        ("mistral", "mistral-large-latest", "mistral"),
        ("groq", "llama-3.3-70b-versatile", "groq"),
        ("deepseek", "deepseek-chat", "deepseek"),
        ("openrouter", "openai/gpt-4o", "openrouter"),
        ("xai", "grok-4", "x-ai"),
        ("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "together"),
    ],
)
@pytest.mark.parametrize(
    "usage",
    [USAGE, Usage(input_tokens=300_000, output_tokens=10, cache_read_tokens=100_000), Usage()],
)
def test_cost_matches_genai_prices(provider: str, model: str, genai_id: str, usage: Usage) -> None:
    assert BUILTIN_PROVIDERS[provider].genai_prices_id == genai_id
    cost = Pricer({}).cost(provider, model, usage)
    expected = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
        ),
        model,
        provider_id=genai_id,
    ).total_price
    assert isinstance(cost, Decimal)
    assert abs(cost - expected) < Decimal("1e-9")


def test_anthropic_cache_tokens_are_priced_as_such() -> None:
    # 100k cache-read tokens out of 100k input cost $0.30/M, not the $3/M input price
    # (below the 200k long-context tier, where both double).
    cost = Pricer({}).cost("anthropic", "claude-sonnet-4-5", Usage(input_tokens=100_000, cache_read_tokens=100_000))
    assert cost == Decimal("0.03")


def test_override_wins() -> None:
    pricer = Pricer({"openai:gpt-4o": PriceOverride.parse({"input": 2.5, "output": 10.0, "cache_read": 1.25})})
    usage = Usage(input_tokens=1000, output_tokens=500, cache_read_tokens=200)
    # (800 * 2.5 + 200 * 1.25 + 500 * 10) / 1e6, exactly
    assert pricer.cost("openai", "gpt-4o", usage) == Decimal("0.00725")
    # a dated snapshot that genai-prices folds into gpt-4o takes the override too
    assert pricer.cost("openai", "gpt-4o-2024-08-06", usage) == Decimal("0.00725")
    assert pricer.cost("OpenAI", "GPT-4o", usage) == Decimal("0.00725")
    # other providers / models are untouched
    assert pricer.cost("azure", "gpt-4o", usage) == Pricer({}).cost("azure", "gpt-4o", usage)


def test_override_for_a_model_genai_prices_does_not_know() -> None:
    pricer = Pricer({"together:my-finetune": PriceOverride(input=Decimal("1"), output=Decimal("2"))})
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=500_000,
                  cache_write_tokens=100_000)
    # cache prices default to the input price
    assert pricer.cost("together", "my-finetune", usage) == Decimal(3)


@pytest.mark.parametrize(
    "table, error",
    [
        ({"input": 1}, "needs both"),
        ({"input": 1, "output": 2, "cahce_read": 1}, "unknown price keys"),
        ({"input": -1, "output": 2}, "not a price"),
        ({"input": "nan", "output": 2}, "not a price"),
        ({"input": True, "output": 2}, "not a price"),
    ],
)
def test_override_parse_rejects(table: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        PriceOverride.parse(table)


def test_override_parse_avoids_float_error() -> None:
    o = PriceOverride.parse({"input": 0.1, "output": "0.3", "cache_write": 3})
    assert (o.input, o.output, o.cache_read, o.cache_write) == (Decimal("0.1"), Decimal("0.3"), None, Decimal(3))


def test_unknown_model_is_none_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    pricer = Pricer({})
    with caplog.at_level(logging.WARNING, logger="spendgate.pricing"):
        for _ in range(3):
            assert pricer.cost("openai", "gpt-nonexistent-9", USAGE) is None
        assert pricer.cost("mystery", "gpt-4o", USAGE) is None
        assert pricer.cost("openai", None, USAGE) is None
        assert pricer.cost("openai", None, USAGE) is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # a request without a model (a listing, an upgrade) is not warned about
    assert sum("gpt-nonexistent-9" in m for m in messages) == 1


@pytest.mark.parametrize(
    "provider, model",
    [("openai", "gpt-4o-2024-08-06"), ("anthropic", "claude-sonnet-4-5-20250929"), ("gemini", "gemini-2.5-flash")],
)
def test_normalise_model_is_genai_prices_id(provider: str, model: str) -> None:
    _, info = get_snapshot().find_provider_model(model, None, BUILTIN_PROVIDERS[provider].genai_prices_id, None)
    assert Pricer({}).normalise_model(provider, model) == info.id


def test_normalise_model_folds_snapshots_and_keeps_unknowns() -> None:
    pricer = Pricer({})
    assert pricer.normalise_model("openai", "gpt-4o-2024-08-06") == "gpt-4o"
    assert pricer.normalise_model("openai", "totally-new-model") == "totally-new-model"


# --- the per-token fast path must give exactly genai-prices' answer, for flat and tiered models alike

MODELS = [
    ("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("openai", "o3-mini"), ("openai", "text-embedding-3-small"),
    ("anthropic", "claude-sonnet-4-5"), ("anthropic", "claude-3-5-haiku-latest"),
    ("gemini", "gemini-2.5-flash"), ("gemini", "gemini-2.5-pro"), ("deepseek", "deepseek-chat"),
]
PRICER = Pricer()


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    inp = draw(st.integers(0, 2_000_000))
    cr = draw(st.integers(0, inp))
    cw = draw(st.integers(0, inp - cr))
    return Usage(input_tokens=inp, cache_read_tokens=cr, cache_write_tokens=cw,
                 output_tokens=draw(st.integers(0, 200_000)), reasoning_tokens=draw(st.integers(0, 10_000)))


@pytest.mark.parametrize("provider,model", MODELS)
@settings(max_examples=60, deadline=None)
@given(usage=usages())
def test_cost_equals_genai_prices_exactly(provider: str, model: str, usage: Usage) -> None:
    genai_id = BUILTIN_PROVIDERS[provider].genai_prices_id
    expected = genai_prices.calc_price(usage, model, provider_id=genai_id).total_price
    assert PRICER.cost(provider, model, usage) == expected


def test_flat_models_take_the_fast_path_and_tiered_ones_do_not() -> None:
    PRICER.cost("openai", "gpt-4o", Usage(input_tokens=1))
    PRICER.cost("gemini", "gemini-2.5-pro", Usage(input_tokens=1))
    assert PRICER._linear_rates("openai", "gpt-4o") is not None
    assert PRICER._linear_rates("gemini", "gemini-2.5-pro") is None  # priced in tiers by prompt size
