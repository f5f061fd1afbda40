"""TLS policy: a model host is always decrypted (decided by the CONNECT target, also when the SNI
says otherwise), a connection whose SNI names a model host is decrypted to be refused, and every
other connection is passed through as bytes."""

from __future__ import annotations

from typing import Any

import pytest
from mitmproxy import connection, tls
from mitmproxy.proxy import context
from mitmproxy.test import tflow

from spendgate.stages.tls import TlsPolicy

MODEL = {"api.openai.com", "api.anthropic.com"}
POLICY = TlsPolicy(lambda host: host in MODEL, lambda host, port: (host, port) != ("127.0.0.1", 9443))


def hello(target: tuple[str, int] | None, sni: str | None) -> Any:
    ctx = context.Context(tflow.tclient_conn(), None)  # type: ignore[arg-type]
    ctx.server = connection.Server(address=target)
    ch = type("Hello", (), {"sni": sni})()
    return tls.ClientHelloData(ctx, ch)  # type: ignore[arg-type]


@pytest.mark.parametrize(("target", "sni", "decrypt"), [
    (("api.openai.com", 443), "api.openai.com", True),
    (("API.OpenAI.com.", 443), "api.openai.com", True),
    (("api.openai.com", 443), "example.com", True),  # a model host is never tunnelled, whatever the SNI
    (("api.openai.com", 443), None, True),
    (("162.159.140.245", 443), "api.openai.com", True),  # decrypted so that routing can refuse it (421)
    (("example.com", 443), "api.anthropic.com", True),
    (("example.com", 443), "example.com", False),
    (("10.1.2.3", 22), None, False),
    (None, "api.openai.com", True),
], ids=["model", "model-spelled-oddly", "model-other-sni", "model-no-sni", "ip-with-model-sni",
        "other-with-model-sni", "other", "other-no-sni", "no-target-model-sni"])
def test_what_is_decrypted(target: tuple[str, int] | None, sni: str | None, decrypt: bool) -> None:
    data = hello(target, sni)
    POLICY.tls_clienthello(data)
    assert data.ignore_connection is (not decrypt)
