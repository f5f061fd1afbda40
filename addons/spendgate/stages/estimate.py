"""What a request will bill, before it is sent: shared by the budget stage (to reserve) and the
meter (to settle answers that report no usage, such as images and speech).

Text endpoints: the prompt counted with tiktoken, plus every answer it asks for (the output
limit, or `[budgets] default_max_output_tokens`, times `n` / `best_of` / `candidateCount`).
Images and audio: what their models bill (image tokens or images, characters, seconds), from the
provider's adapter.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from spendgate.providers import adapter_for
from spendgate.providers.tokens import estimate_input_tokens
from spendgate.providers.wire import EndpointKind, RequestFacts, Usage
from spendgate.stages.call import OFF_LOOP_BYTES, Call

MAX_OUTPUT_TOKENS = 10_000_000  # a negative or absurd limit must not shrink or overflow an estimate
_NO_OUTPUT = frozenset({EndpointKind.EMBEDDINGS})
_TEXT = frozenset({EndpointKind.CHAT, EndpointKind.RESPONSES, EndpointKind.MESSAGES, EndpointKind.COMPLETIONS,
                   EndpointKind.EMBEDDINGS, EndpointKind.REALTIME})
_BOUND_FRAMING = 64  # per-message framing tokens are far fewer than the JSON bytes around each message


class Estimator:
    def __init__(self, default_max_output_tokens: int) -> None:
        self.default_max_output_tokens = default_max_output_tokens

    def facts(self, call: Call) -> RequestFacts:
        return RequestFacts(call.model_requested, call.stream, call.max_output_tokens, call.choices,
                            call.thinking_budget)

    def output_per_choice(self, call: Call) -> int:
        """Output tokens one answer may use: its limit, or the default plus any thinking budget."""
        if call.endpoint_kind in _NO_OUTPUT:
            return 0
        if call.max_output_tokens is not None and call.max_output_tokens >= 0:
            out = call.max_output_tokens  # 0: a call that holds its prompt only (one the server started)
        else:  # none, or a negative one ("no limit" to some parsers): held, and sent, at the default
            out = self.default_max_output_tokens + call.thinking_budget
        return min(max(out, 0), MAX_OUTPUT_TOKENS)

    async def prompt_tokens(self, call: Call) -> int:
        kind = call.endpoint_kind
        if not kind.metered or call.body is None:
            return 0
        family, body, model = call.provider.spec.family, call.body, call.model_requested
        if call.request_bytes > OFF_LOOP_BYTES:
            return await asyncio.to_thread(estimate_input_tokens, family, kind, body, model)
        return estimate_input_tokens(family, kind, body, model)

    async def usage(self, call: Call) -> Usage:
        """Everything the request asks for, as a `Usage` to price."""
        if not call.endpoint_kind.metered or call.body is None:
            return Usage()
        inp = await self.prompt_tokens(call)
        media = adapter_for(call.provider.spec.family).media_usage(
            call.endpoint_kind, call.body, call.uploads, self.facts(call), inp)
        if media is not None:
            return media
        return Usage(input_tokens=inp, output_tokens=self.output_per_choice(call) * call.choices)

    def bound(self, call: Call) -> Usage | None:
        """A cheap upper bound of `usage` for text requests, without counting: a token is at least
        one byte, so the prompt is at most the decoded body's size in tokens. None: count instead
        (media, whose bodies say little about what they bill)."""
        if not call.endpoint_kind.metered or call.body is None or call.uploads:
            return None
        if call.endpoint_kind not in _TEXT:
            return None
        inp = call.body_bytes or call.request_bytes
        return Usage(input_tokens=inp + _BOUND_FRAMING, output_tokens=self.output_per_choice(call) * call.choices)

    @staticmethod
    def with_output(usage: Usage, per_choice: int, choices: int) -> Usage:
        return replace(usage, output_tokens=per_choice * choices)


def clampable(call: Call) -> bool:
    """A request whose output limit the gateway can lower (text answers, JSON bodies)."""
    return (call.endpoint_kind in (EndpointKind.CHAT, EndpointKind.RESPONSES, EndpointKind.MESSAGES,
                                   EndpointKind.COMPLETIONS)
            and call.body is not None and not call.uploads)


__all__ = ["MAX_OUTPUT_TOKENS", "Estimator", "clampable"]
