"""The per-token fast path must give exactly genai-prices' answer, for flat and tiered models alike."""

from __future__ import annotations

import genai_prices
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.pricing import GENAI_PROVIDER_IDS, Pricer
from spendgate.usage import Usage

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
    expected = genai_prices.calc_price(usage, model, provider_id=GENAI_PROVIDER_IDS.get(provider, provider)).total_price
    assert PRICER.cost(provider, model, usage) == expected


def test_flat_models_take_the_fast_path_and_tiered_ones_do_not() -> None:
    PRICER.cost("openai", "gpt-4o", Usage(input_tokens=1))
    PRICER.cost("gemini", "gemini-2.5-pro", Usage(input_tokens=1))
    assert PRICER._linear_rates("openai", "gpt-4o") is not None
    assert PRICER._linear_rates("gemini", "gemini-2.5-pro") is None  # priced in tiers by prompt size
