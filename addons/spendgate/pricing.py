"""What a request cost, in USD, as a `Decimal`, and where that price came from.

Prices come from `[prices.overrides]` when configured, else from genai-prices' bundled data,
else (with `[prices] unknown_model = "fallback"`) from the fallback rates; a model with none of
these has an unknown cost, which the budget stage refuses for callers under a cap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

import genai_prices
from genai_prices.data_snapshot import get_snapshot

from spendgate.money import parse_amount
from spendgate.providers import BUILTIN_PROVIDERS
from spendgate.providers.wire import Usage

__all__ = ["CostSource", "PriceOverride", "Priced", "Pricer", "price_line"]

log = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)
# Model names come from clients: bound what we remember about them.
_MEMO_LIMIT = 10_000

def _price(value: object) -> Decimal:
    try:
        return parse_amount(value)
    except ValueError:
        raise ValueError(f"not a price: {value!r}") from None


class CostSource(StrEnum):
    PROVIDER = "provider"  # genai-prices' data for the provider
    OVERRIDE = "override"  # [prices.overrides]
    FALLBACK = "fallback"  # [prices] fallback, for a model with neither
    UNKNOWN = "unknown"  # no price: the cost is not known


@dataclass(frozen=True)
class Priced:
    cost: Decimal | None  # None when the source is UNKNOWN
    source: CostSource


_PER_TOKEN_KEYS = ("input", "output", "cache_read", "cache_write", "input_audio", "output_audio")
_OVERRIDE_KEYS = frozenset({*_PER_TOKEN_KEYS, "per_image", "per_minute", "per_million_characters"})


@dataclass(frozen=True)
class PriceOverride:
    """USD per million tokens (input, output, cache, audio), and for models billed otherwise USD
    per image, per minute of audio or per million characters. Cache and audio token prices
    default to the plain input / output price.

    >>> PriceOverride.parse({"input": 2.5, "output": 10.0, "cache_read": 1.25}).cache_read
    Decimal('1.25')
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None
    per_image: Decimal = Decimal(0)
    per_minute: Decimal = Decimal(0)
    per_million_characters: Decimal = Decimal(0)

    @classmethod
    def parse(cls, table: Mapping[str, object]) -> PriceOverride:
        """From one `[prices.overrides]` TOML value; raises ValueError on bad or unknown keys."""
        unknown = set(table) - _OVERRIDE_KEYS
        if unknown:
            raise ValueError(f"unknown price keys: {', '.join(sorted(unknown))}")
        if "input" not in table or "output" not in table:
            raise ValueError("a price override needs both input and output")
        return cls(**{k: _price(v) for k, v in table.items()})

    def cost(self, usage: Usage) -> Decimal:
        cache_read, cache_write = usage.cache_read_tokens, usage.cache_write_tokens
        audio_in, audio_out = usage.input_audio_tokens, usage.output_audio_tokens
        uncached = max(usage.input_tokens - cache_read - cache_write - audio_in, 0)
        tokens = (
            uncached * self.input
            + cache_read * (self.input if self.cache_read is None else self.cache_read)
            + cache_write * (self.input if self.cache_write is None else self.cache_write)
            + audio_in * (self.input if self.input_audio is None else self.input_audio)
            + max(usage.output_tokens - audio_out, 0) * self.output
            + audio_out * (self.output if self.output_audio is None else self.output_audio)
            + usage.input_characters * self.per_million_characters
        )
        return (tokens / _MILLION + usage.images * self.per_image
                + Decimal(str(usage.audio_seconds)) * self.per_minute / 60)


def price_line(provider: str, model: str) -> str:
    """The `[prices.overrides]` line that prices `model` (USD per million tokens), for messages."""
    return f'"{provider}:{model}" = {{ input = ..., output = ... }}'


def _key(provider: str, model: str) -> str:
    return f"{provider.lower()}:{model.lower()}"


@dataclass(frozen=True)
class _LinearRates:
    """USD per token (not per million) of each kind; `input` is for uncached input."""

    input: Decimal
    cache_read: Decimal
    cache_write: Decimal
    output: Decimal

    def cost(self, usage: Usage) -> Decimal:
        # input_tokens counts cache reads and writes too (genai-prices' convention)
        return (usage.input_tokens * self.input + usage.cache_read_tokens * self.cache_read
                + usage.cache_write_tokens * self.cache_write + usage.output_tokens * self.output)


class Pricer:
    """Prices a request. Lookups are memoised per (provider, model): this runs on every request.

    >>> Pricer({}).cost("openai", "gpt-4o", Usage(input_tokens=1_000_000)) == Decimal("2.5")
    True
    """

    def __init__(self, overrides: Mapping[str, PriceOverride] | None = None,
                 fallback: PriceOverride | None = None) -> None:
        self._overrides = {k.lower(): v for k, v in (overrides or {}).items()}
        self._fallback = fallback  # [prices] fallback when unknown_model = "fallback", else None
        self._canonical: dict[tuple[str, str], str | None] = {}
        self._models: dict[tuple[str, str], tuple[Any, Any] | None] = {}
        self._rates: dict[tuple[str, str], _LinearRates | None] = {}
        self._warned: set[tuple[str, str | None]] = set()

    def cost(self, provider: str, model: str | None, usage: Usage) -> Decimal | None:
        """USD for `usage`, full precision; None when the model has no known price."""
        return self.price(provider, model, usage=usage).cost

    def price(self, provider: str, *models: str | None, usage: Usage) -> Priced:
        """USD for `usage` priced as the first of `models` that has a price (e.g. the model the
        provider reported, then the one requested), else at the fallback rates, else unknown."""
        for model in models:
            if not model:
                continue
            override = self._override(provider, model)
            if override is not None:
                return Priced(override.cost(usage), CostSource.OVERRIDE)
            if self._lookup(provider, model) is not None:
                cost = self._provider_cost(provider, model, usage)
                if cost is not None:
                    return Priced(cost, CostSource.PROVIDER)
        named = next((m for m in models if m), None)
        if self._fallback is not None:
            return Priced(self._fallback.cost(usage), CostSource.FALLBACK)
        if named is not None:  # a request without a model (a listing, an upgrade) is not worth a warning
            self._warn_once(provider, named, "no price known")
        return Priced(None, CostSource.UNKNOWN)

    def source(self, provider: str, model: str | None) -> CostSource:
        """Where this model's price would come from (UNKNOWN: nowhere)."""
        if model and self._override(provider, model) is not None:
            return CostSource.OVERRIDE
        if model and self._lookup(provider, model) is not None:
            return CostSource.PROVIDER
        return CostSource.FALLBACK if self._fallback is not None else CostSource.UNKNOWN

    def _provider_cost(self, provider: str, model: str, usage: Usage) -> Decimal | None:
        if usage.only_tokens:
            rates = self._linear_rates(provider, model)
            if rates is not None:
                return rates.cost(usage)
        found = self._models.get((provider, model))
        try:
            # genai_prices.calc_price would search the price data again on every call.
            result = (found[1].calc_price(usage, found[0]) if found is not None else
                      genai_prices.calc_price(usage, model, provider_id=self._provider_id(provider)))
        except (LookupError, ValueError) as e:
            self._warn_once(provider, model, str(e))
            return None
        return Decimal(result.total_price)

    def _linear_rates(self, provider: str, model: str) -> _LinearRates | None:
        """Per-token rates for models with flat prices, proven equal to genai-prices' own result.

        genai-prices' general calculation costs ~60 µs a call; most models' prices are flat per
        token kind, so cost is linear in the counts. The rates are derived from calc_price itself
        and kept only if they reproduce it exactly on probe usages; tiered, time-conditional or
        otherwise non-linear prices keep going through calc_price.
        """
        key = (provider, model)
        if key in self._rates:
            return self._rates[key]
        rates: _LinearRates | None = None
        found = self._models.get(key)
        if found is not None and not isinstance(found[1].prices, list):
            def calc(u: Usage) -> Decimal:
                return Decimal(found[1].calc_price(u, found[0]).total_price)

            try:
                base = calc(Usage(input_tokens=1))
                candidate = _LinearRates(
                    input=base,
                    cache_read=calc(Usage(input_tokens=1, cache_read_tokens=1)) - base,
                    cache_write=calc(Usage(input_tokens=1, cache_write_tokens=1)) - base,
                    output=calc(Usage(output_tokens=1)),
                )
                probes = (
                    Usage(input_tokens=123_457, cache_read_tokens=20_011, cache_write_tokens=3_001, output_tokens=9_871,
                          reasoning_tokens=1_234),
                    Usage(input_tokens=7, output_tokens=3_000_001, reasoning_tokens=3_000_000),
                    Usage(input_tokens=1_500_000, cache_read_tokens=1_000_000, output_tokens=1),
                )
                if all(candidate.cost(p) == calc(p) for p in probes):
                    rates = candidate
            except (LookupError, ValueError, ArithmeticError):
                rates = None
        if len(self._rates) >= _MEMO_LIMIT:
            self._rates.clear()
        self._rates[key] = rates
        return rates

    def knows(self, provider: str, model: str) -> bool:
        return self._override(provider, model) is not None or self._lookup(provider, model) is not None

    def normalise_model(self, provider: str, model: str) -> str:
        """genai-prices' id for `model` (dated snapshots fold into their family), else `model`."""
        return self._lookup(provider, model) or model

    def _override(self, provider: str, model: str) -> PriceOverride | None:
        if not self._overrides:
            return None
        found = self._overrides.get(_key(provider, model))
        if found is None:
            canonical = self._lookup(provider, model)
            if canonical is not None:
                found = self._overrides.get(_key(provider, canonical))
        return found

    def _lookup(self, provider: str, model: str) -> str | None:
        key = (provider, model)
        try:
            return self._canonical[key]
        except KeyError:
            pass
        try:
            found = get_snapshot().find_provider_model(model, None, self._provider_id(provider), None)
            canonical: str | None = found[1].id
        except LookupError:
            found = None
            canonical = None  # remembered: genai-prices does not cache misses and they scan everything
        if len(self._models) >= _MEMO_LIMIT:
            self._models.clear()
        self._models[key] = found
        if len(self._canonical) >= _MEMO_LIMIT:
            self._canonical.clear()
        self._canonical[key] = canonical
        return canonical

    @staticmethod
    def _provider_id(provider: str) -> str:
        spec = BUILTIN_PROVIDERS.get(provider.lower())
        return spec.genai_prices_id if spec is not None else provider.lower()

    def _warn_once(self, provider: str, model: str | None, why: str) -> None:
        if (provider, model) in self._warned:
            return
        if len(self._warned) >= _MEMO_LIMIT:
            return  # a flood of made-up names: stay quiet rather than grow
        self._warned.add((provider, model))
        # %r: a model name comes from the client and may hold anything (newlines, lone surrogates).
        log.warning("no price for provider=%s model=%r (%s); cost recorded as unknown", provider,
                    model[:200] if model else model, why)
