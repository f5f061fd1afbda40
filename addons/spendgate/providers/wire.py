"""Values every wire family shares: what a request is, and what a response said it used.

Counts follow genai-prices' conventions so a `Usage` can be handed to `genai_prices.calc_price`
unchanged: `input_tokens` is the TOTAL input (cache reads and writes included), `output_tokens`
includes reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["EndpointKind", "Family", "RequestFacts", "Upload", "Usage", "UsageSource"]


class EndpointKind(StrEnum):
    CHAT = "chat"
    RESPONSES = "responses"
    MESSAGES = "messages"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    IMAGES = "images"
    AUDIO = "audio"
    REALTIME = "realtime"
    BATCHES = "batches"
    FILES = "files"
    MODELS = "models"
    OTHER = "other"

    @property
    def metered(self) -> bool:
        """A request of this kind is billed by what it asks for, and the gateway can price it up front."""
        return self in _METERED


_METERED = frozenset({EndpointKind.CHAT, EndpointKind.RESPONSES, EndpointKind.MESSAGES, EndpointKind.COMPLETIONS,
                      EndpointKind.EMBEDDINGS, EndpointKind.IMAGES, EndpointKind.AUDIO, EndpointKind.REALTIME})


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
    input_audio_tokens: int = 0  # the audio part of input_tokens (Realtime, gpt-audio, transcription)
    output_audio_tokens: int = 0  # the audio part of output_tokens
    input_characters: int = 0  # text-to-speech models bill characters
    audio_seconds: float = 0.0  # transcription models bill minutes
    images: int = 0  # images made, for models priced per image ([prices.overrides] per_image)

    @property
    def only_tokens(self) -> bool:
        """Priced by text and cache tokens alone (no audio, characters, seconds or images)."""
        return not (self.input_audio_tokens or self.output_audio_tokens or self.input_characters
                    or self.audio_seconds or self.images)


@dataclass(frozen=True)
class RequestFacts:
    model: str | None
    stream: bool
    max_output_tokens: int | None
    choices: int = 1  # answers the request asks for (n, best_of, candidateCount): each one is billed
    thinking_budget: int = 0  # thinking tokens asked for beyond the output limit (Gemini thinkingConfig)


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart request (audio to transcribe, an image to edit): measured, never kept."""

    field: str
    filename: str | None
    content_type: str | None
    size: int
    audio_seconds: float | None = None  # its duration, when the file says (WAV headers)
