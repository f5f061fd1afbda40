"""Values every wire family shares: what a request is, and what a response said it used.

Counts follow genai-prices' conventions so a `Usage` can be handed to `genai_prices.calc_price`
unchanged: `input_tokens` is the TOTAL input (cache reads and writes included), `output_tokens`
includes reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["EndpointKind", "Family", "RequestFacts", "Usage", "UsageSource"]


class EndpointKind(StrEnum):
    CHAT = "chat"
    RESPONSES = "responses"
    MESSAGES = "messages"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    OTHER = "other"


class Family(StrEnum):
    # Wire format family; azure, mistral, groq, deepseek, openrouter, xai, together speak OPENAI.
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"


class UsageSource(StrEnum):
    PROVIDER = "provider"
    ESTIMATED = "estimated"


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0  # TOTAL input tokens, including cache reads and cache writes (genai-prices' convention)
    output_tokens: int = 0  # including reasoning tokens
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    model_reported: str | None = None
    upstream_request_id: str | None = None  # response id if present (e.g. chatcmpl-…, msg_…); optional


@dataclass(frozen=True)
class RequestFacts:
    model: str | None
    stream: bool
    max_output_tokens: int | None
