"""The Python clients as a developer's script uses them: built with defaults, so the key, the proxy
and the CA come from the environment only (the onboarding lines).

    python tests/rig/py_clients.py openai|anthropic|requests|httpx

Prints ``NAME: ANSWER`` per call; on an error prints ``ERROR type: message`` and exits 1. The
raw-HTTP clients call the APIs as the providers' docs show (key from ``$OPENAI_API_KEY`` /
``$ANTHROPIC_API_KEY``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

GPT = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-20250514"
MSGS = [{"role": "user", "content": "Say hello"}]
OPENAI_CHAT = "https://api.openai.com/v1/chat/completions"
ANTHROPIC_MESSAGES = "https://api.anthropic.com/v1/messages"


def openai_sdk() -> None:
    import openai

    client = openai.OpenAI(max_retries=0, timeout=30)
    r = client.chat.completions.create(model=GPT, messages=MSGS)  # type: ignore[arg-type]
    print(f"openai: {r.choices[0].message.content}")
    chunks = client.chat.completions.create(model=GPT, messages=MSGS, stream=True)  # type: ignore[arg-type]
    print(f"openai stream: {''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)}")  # type: ignore[union-attr]


def anthropic_sdk() -> None:
    import anthropic

    client = anthropic.Anthropic(max_retries=0, timeout=30)
    m = client.messages.create(model=CLAUDE, max_tokens=64, messages=MSGS)  # type: ignore[arg-type]
    print(f"anthropic: {m.content[0].text}")  # type: ignore[union-attr]
    with client.messages.stream(model=CLAUDE, max_tokens=64, messages=MSGS) as stream:  # type: ignore[arg-type]
        print(f"anthropic stream: {''.join(stream.text_stream)}")


def requests_post() -> None:
    import requests

    r = requests.post(OPENAI_CHAT, json={"model": GPT, "messages": MSGS}, timeout=30,
                      headers={"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"})
    r.raise_for_status()
    print(f"requests: {r.json()['choices'][0]['message']['content']}")


def httpx_post() -> None:
    import httpx

    r = httpx.post(ANTHROPIC_MESSAGES, json={"model": CLAUDE, "max_tokens": 64, "messages": MSGS}, timeout=30,
                   headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"})
    r.raise_for_status()
    print(f"httpx: {r.json()['content'][0]['text']}")


CLIENTS: dict[str, Any] = {"openai": openai_sdk, "anthropic": anthropic_sdk, "requests": requests_post,
                           "httpx": httpx_post}


def main(argv: list[str]) -> int:
    try:
        CLIENTS[argv[0]]()
    except Exception as exc:  # noqa: BLE001 - the test shows whatever went wrong
        cause = exc.__cause__ or exc.__context__
        print(f"ERROR {type(exc).__name__}: {exc}" + (f" (cause: {cause!r})" if cause else ""), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
