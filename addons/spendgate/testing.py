"""Builders for tests, in the spirit of `mitmproxy.test.tflow`: a provider, a key, a flow as it
arrives inside a model-host tunnel, and the `Call` a stage would find on it. No I/O."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from mitmproxy import http
from mitmproxy.test import tflow as mtflow
from mitmproxy.test import tutils

from spendgate.keys import KeyRecord, hash_secret
from spendgate.providers import BUILTIN_PROVIDERS
from spendgate.providers.wire import EndpointKind
from spendgate.settings import ProviderSettings, Upstream
from spendgate.stages.call import META, Call, new_request_id

SECRET = "S" * 43


def tprovider(name: str = "openai", api_key: str | None = "upstream-key-for-tests", *,
              upstream: Upstream | None = None, verify_upstream_tls: bool = True) -> ProviderSettings:
    spec = BUILTIN_PROVIDERS[name]
    return ProviderSettings(name=name, spec=spec, hosts=spec.hosts, api_key=api_key, api_key_source="test",
                            upstream=upstream, verify_upstream_tls=verify_upstream_tls)


def tkey(user: str = "alice", key_id: str = "alice001", *, team: str | None = None, state: str = "active",
         expires_at: datetime | None = None, models: tuple[str, ...] = (), rpm: int | None = None, byok: bool = False,
         capture_reason: str | None = None) -> KeyRecord:
    """A key record whose secret is `SECRET` (the full key is `f"sg_{key_id}_{SECRET}"`)."""
    return KeyRecord(key_id=key_id, user=user, team=team, state=state, secret_hash=hash_secret(SECRET),
                     prev_secret_hash=None, prev_valid_until=None, expires_at=expires_at, allowed_models=models,
                     rpm=rpm, byok=byok, capture_content=capture_reason is not None, capture_reason=capture_reason)


def tflow(host: str = "api.openai.com", path: str = "/v1/chat/completions", *, method: str = "POST",
          body: dict[str, Any] | bytes | None = None, headers: dict[str, str] | None = None,
          resp: http.Response | None = None) -> http.HTTPFlow:
    """A request as it arrives inside a TLS tunnel to `host` (the SNI names it too)."""
    content = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
    hdrs = http.Headers(host=host)
    hdrs["content-type"] = "application/json"
    req = tutils.treq(host=host, port=443, scheme=b"https", method=method.encode(), path=path.encode(),
                      headers=hdrs, content=content)
    for k, v in (headers or {}).items():
        req.headers[k] = v
    flow = mtflow.tflow(req=req)
    flow.client_conn.sni = host
    if resp is not None:
        flow.response = resp
    return flow


def tcall(flow: http.HTTPFlow | None = None, *, provider: ProviderSettings | None = None, key: KeyRecord | None = None,
          kind: EndpointKind = EndpointKind.CHAT, body: dict[str, Any] | None = None, **fields: Any) -> Call:
    """The Call the stages before `Policy` would have left on `flow` (attached when given)."""
    provider = provider or tprovider()
    fields.setdefault("model_requested", (body or {}).get("model"))
    fields.setdefault("stream", (body or {}).get("stream") is True)
    call = Call(request_id=new_request_id(), provider=provider, host=provider.hosts[0].lstrip("*."), key=key,
                endpoint_kind=kind, body=body, **fields)
    if flow is not None:
        flow.metadata[META] = call
        if body is not None:
            call.request_bytes = len(flow.request.raw_content or b"")
    return call


def tresponse(status: int = 200, body: dict[str, Any] | bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> http.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.Response.make(status, content, {"content-type": content_type, **(headers or {})})
