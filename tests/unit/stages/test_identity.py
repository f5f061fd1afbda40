"""spendgate.stages.identity: proxy credentials parsing, and the Identity stage driven with tflow flows
(behind Routing, which makes the per-request Call, and before Forward, which sets the upstream key).

mitmproxy style: no process, no network; the stage gets a small runtime whose registry is a dict.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from spendgate.keys import KeyRecord, hash_secret
from spendgate.settings import parse_settings
from spendgate.stages.call import META, REQUEST_ID_HEADER, Call
from spendgate.stages.forward import Forward
from spendgate.stages.identity import Identity, ProxyCred, parse_proxy_authorization
from spendgate.stages.redaction import Redactor
from spendgate.stages.routing import Routes, Routing, connect_targets

SECRET = "S" * 43
KEY = f"sg_alice001_{SECRET}"
BYOK_KEY = f"sg_byok0001_{SECRET}"
REVOKED_KEY = f"sg_revoked1_{SECRET}"
EXPIRED_KEY = f"sg_expired1_{SECRET}"
UNKNOWN_KEY = f"sg_nobody00_{SECRET}"
UPSTREAM = {"openai": "up-openai", "anthropic": "up-anthropic", "gemini": "up-gemini", "azure": "up-azure"}
FOREIGN = "sk-" + "proj" + "Q" * 24  # built at runtime: a leak scanner reads the source


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- parse_proxy_authorization ------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        (basic("dev", KEY), ProxyCred("dev", KEY)),
        ("basic " + base64.b64encode(f"dev:{KEY}".encode()).decode(), ProxyCred("dev", KEY)),  # scheme any case
        ("BASIC " + base64.b64encode(b"u:p").decode(), ProxyCred("u", "p")),
        (basic("", KEY), ProxyCred("", KEY)),  # no user name
        (basic(KEY, ""), ProxyCred(KEY, "")),  # key as user name
        (basic("dev", "a:b:c"), ProxyCred("dev", "a:b:c")),  # only the first colon splits
        (basic("d%40v", "sg%5Fx"), ProxyCred("d@v", "sg_x")),  # URL-escaped in HTTPS_PROXY, unescaped here
        ("Basic  " + base64.b64encode(b"u:p").decode() + " ", ProxyCred("u", "p")),  # stray spaces
        (basic("jos\u00e9", "p"), ProxyCred("jos\u00e9", "p")),  # UTF-8 user names
    ],
)
def test_parse_good(header: str | None, expected: ProxyCred | None) -> None:
    assert parse_proxy_authorization(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\x80").decode(),  # not UTF-8
        "Basic",
        "Basic ",
        "Bearer " + KEY,
        "Digest username=dev",
        KEY,  # a bare key, no scheme
        "NTLM TlRMTVNTUAABAAAA",
    ],
)
def test_parse_malformed(header: str) -> None:
    cred = parse_proxy_authorization(header)
    assert cred is not None and cred.malformed
    assert cred.gateway_key is None


@pytest.mark.parametrize(
    ("user", "password", "expected"),
    [
        ("dev", KEY, KEY),
        (KEY, "x", KEY),  # some tools only let you set a user name
        (KEY, BYOK_KEY, BYOK_KEY),  # the password wins
        ("dev", "hunter2", None),
        ("", "", None),
        ("dev", " " + KEY, " " + KEY),  # kept as given; parse_key strips later
    ],
)
def test_gateway_key_from_cred(user: str, password: str, expected: str | None) -> None:
    assert ProxyCred(user, password).gateway_key == expected


# -- the Identity stage -------------------------------------------------------


def _rec(key_id: str, **kw: Any) -> KeyRecord:
    base: dict[str, Any] = dict(
        key_id=key_id, user=key_id.rstrip("0123456789"), team="core", state="active",
        secret_hash=hash_secret(SECRET), prev_secret_hash=None, prev_valid_until=None, expires_at=None,
        allowed_models=(), rpm=None, byok=False, capture_content=False, capture_reason=None,
    )
    base.update(kw)
    return KeyRecord(**base)


@dataclass
class FakeRegistry:
    keys: dict[str, KeyRecord]
    used: list[str] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)

    def get(self, key_id: str) -> KeyRecord | None:
        return self.keys.get(key_id)

    def load_one(self, key_id: str) -> KeyRecord | None:
        self.loads.append(key_id)
        return None

    def mark_used(self, key_id: str) -> None:
        self.used.append(key_id)


class Stages:
    """Routing (which builds the per-request Call), Identity, then Forward (which sets the upstream
    key), as the pipeline runs them for one request."""

    def __init__(self, identity: Identity, routing: Routing, forward: Forward) -> None:
        self.identity, self.routing, self.forward = identity, routing, forward

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        self.routing.http_connect(flow)
        await self.identity.http_connect(flow)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.routing.requestheaders(flow)
        await self.identity.requestheaders(flow)
        if flow.response is None:
            self.forward.request(flow)


def make_identity(block_other_hosts: bool = False,
                  upstream: dict[str, str] | None = None) -> tuple[Stages, FakeRegistry]:
    past = datetime.now(timezone.utc) - timedelta(days=1)
    reg = FakeRegistry({
        "alice001": _rec("alice001"),
        "byok0001": _rec("byok0001", byok=True),
        "revoked1": _rec("revoked1", state="revoked"),
        "expired1": _rec("expired1", expires_at=past),
    })
    upstream = UPSTREAM if upstream is None else upstream
    settings = parse_settings(
        {"proxy": {"block_other_hosts": block_other_hosts},
         "providers": {p: {"api_key": f"env:K_{p.upper()}"} for p in ("openai", "anthropic", "gemini", "azure")}},
        {f"K_{p.upper()}": v for p, v in upstream.items()},
    )
    routes = Routes(settings.providers)
    identity = Identity(reg, routes.is_model_host, settings.proxy.block_other_hosts)
    return Stages(identity, Routing(routes.provider_for, connect_targets()), Forward(Redactor([]))), reg


def request(host: str, path: str = "/v1/chat/completions", headers: dict[str, str] | None = None,
            method: str = "POST") -> http.HTTPFlow:
    req = tutils.treq(host=host, port=443, scheme=b"https", method=method.encode(), path=path.encode(),
                      headers=http.Headers(**{"content-type": "application/json"}), content=b"{}")
    for k, v in (headers or {}).items():
        req.headers.add(k, v)
    f = tflow.tflow(req=req)  # tclient_conn() has finished its TLS handshake
    f.client_conn.sni = host  # as a client naming this host would send it
    return f


def connect(host: str, port: int, proxy_auth: str | None, client_conn: Any = None) -> http.HTTPFlow:
    headers = http.Headers(**({"Proxy-Authorization": proxy_auth} if proxy_auth is not None else {}))
    req = tutils.treq(method=b"CONNECT", host=host, port=port, scheme=b"", authority=f"{host}:{port}".encode(),
                      path=b"", headers=headers, content=b"")
    f = tflow.tflow(req=req) if client_conn is None else tflow.tflow(req=req, client_conn=client_conn)
    return f


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def error_of(flow: http.HTTPFlow) -> tuple[int, str | None, str]:
    assert flow.response is not None
    doc = json.loads(flow.response.content or b"{}")
    err = doc["error"]
    return flow.response.status_code, err.get("code") if isinstance(err, dict) else None, json.dumps(doc)


def auth_headers(flow: http.HTTPFlow) -> list[tuple[str, str]]:
    names = {"authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization"}
    return [(k.lower(), v) for k, v in flow.request.headers.items(multi=True) if k.lower() in names]


@pytest.mark.parametrize(
    ("host", "headers", "path", "expected_header"),
    [
        ("api.openai.com", {"Authorization": f"Bearer {KEY}"}, "/v1/chat/completions",
         ("authorization", "Bearer up-openai")),
        ("api.anthropic.com", {"x-api-key": KEY, "Authorization": f"Bearer {KEY}"}, "/v1/messages",
         ("x-api-key", "up-anthropic")),
        ("generativelanguage.googleapis.com", {"x-goog-api-key": KEY},
         "/v1beta/models/gemini-2.0-flash:generateContent", ("x-goog-api-key", "up-gemini")),
        ("generativelanguage.googleapis.com", {}, f"/v1beta/models/gemini-2.0-flash:generateContent?alt=sse&key={KEY}",
         ("x-goog-api-key", "up-gemini")),
        ("myres.openai.azure.com", {"api-key": KEY},
         "/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01", ("api-key", "up-azure")),
    ],
)
def test_gateway_key_in_the_sdk_slot_is_swapped(host: str, headers: dict[str, str], path: str,
                                                 expected_header: tuple[str, str]) -> None:
    ident, reg = make_identity()
    f = request(host, path, headers)
    run(ident.requestheaders(f))
    assert f.response is None
    assert auth_headers(f) == [expected_header]
    assert "key" not in f.request.query
    assert KEY not in f.request.url and SECRET not in str(f.request.headers)
    call = f.metadata[META]
    assert isinstance(call, Call) and call.user == "alice"  # attributed by the key in the SDK slot
    assert reg.used == ["alice001"]
    if "alt=sse" in path:
        assert f.request.query["alt"] == "sse"  # other parameters stay


def test_proxy_credentials_from_connect_are_remembered_per_connection() -> None:
    ident, reg = make_identity()
    c = connect("api.openai.com", 443, basic("dev", KEY))
    run(ident.http_connect(c))
    assert c.response is None  # a model host: identity is checked per request, provider-shaped
    assert "proxy-authorization" not in c.request.headers
    f = request("api.openai.com", headers={"Authorization": "Bearer unused"})
    f.client_conn = c.client_conn
    f.client_conn.sni = "api.openai.com"  # the TLS inside the tunnel
    run(ident.requestheaders(f))
    assert f.response is None
    assert auth_headers(f) == [("authorization", "Bearer up-openai")]
    assert f.metadata[META].user == "alice"  # attributed by the CONNECT's proxy credentials
    # another connection does not inherit them
    g = request("api.openai.com")
    run(ident.requestheaders(g))
    assert error_of(g)[:2] == (401, "spendgate_no_key")


def test_proxy_authorization_on_the_request_itself() -> None:
    ident, _ = make_identity()
    f = request("api.openai.com", headers={"Proxy-Authorization": basic("dev", KEY)})
    run(ident.requestheaders(f))
    assert f.response is None and "proxy-authorization" not in f.request.headers
    assert auth_headers(f) == [("authorization", "Bearer up-openai")]


@pytest.mark.parametrize(
    ("host", "headers", "status", "code", "text"),
    [
        ("api.openai.com", {}, 401, "spendgate_no_key", "No Spendgate key"),
        ("api.openai.com", {"Authorization": "Bearer sg_nope"},
         401, "spendgate_invalid_key", "not a valid Spendgate key"),
        ("api.openai.com", {"Authorization": "Bearer " + "\u00ff" * 5000}, 401, "spendgate_invalid_key", "not a valid"),
        ("api.openai.com", {"Authorization": f"Bearer {UNKNOWN_KEY}"},
         401, "spendgate_unknown_key", "Unknown Spendgate key"),
        ("api.openai.com", {"Authorization": f"Bearer sg_alice001_{'W' * 43}"},
         401, "spendgate_unknown_key", "Unknown"),
        ("api.openai.com", {"Authorization": f"Bearer {REVOKED_KEY}"}, 403, "spendgate_key_revoked", "revoked"),
        ("api.openai.com", {"Authorization": f"Bearer {EXPIRED_KEY}"}, 403, "spendgate_key_expired", "expired"),
        ("api.openai.com", {"Authorization": f"Bearer {FOREIGN}"}, 403, "spendgate_foreign_key", "Provider API keys"),
        ("api.openai.com", {"Proxy-Authorization": basic("dev", KEY), "Authorization": f"Bearer {FOREIGN}"},
         403, "spendgate_foreign_key", "--byok"),
        ("api.openai.com", {"Proxy-Authorization": "Basic %%%"},
         401, "spendgate_bad_proxy_credentials", "Proxy credentials"),
        ("api.openai.com", {"Proxy-Authorization": basic("dev", "hunter2")},
         401, "spendgate_bad_proxy_credentials", ""),
    ],
)
def test_refusals(host: str, headers: dict[str, str], status: int, code: str, text: str) -> None:
    ident, reg = make_identity()
    f = request(host, headers=headers)
    run(ident.requestheaders(f))
    got_status, got_code, body = error_of(f)
    assert (got_status, got_code) == (status, code)
    assert text in body
    assert f.response is not None and f.response.headers[REQUEST_ID_HEADER].startswith("sgr_")
    assert f.response.headers["content-type"] == "application/json"
    # nothing of the client's credentials is kept on a refused request either
    assert auth_headers(f) == []
    valid_key_sent = "Proxy-Authorization" in headers and code == "spendgate_foreign_key"
    assert reg.used == (["alice001"] if valid_key_sent else [])
    call = f.metadata[META]
    assert call.outcome == ("blocked_policy" if code == "spendgate_foreign_key" else "blocked_auth")


@pytest.mark.parametrize(
    ("host", "shape"),
    [("api.anthropic.com", "anthropic"), ("generativelanguage.googleapis.com", "gemini"),
     ("x.openai.azure.com", "openai")],
)
def test_refusals_are_provider_shaped(host: str, shape: str) -> None:
    ident, _ = make_identity()
    f = request(host, "/v1/messages")
    run(ident.requestheaders(f))
    assert f.response is not None and f.response.status_code == 401
    doc = json.loads(f.response.content or b"")
    if shape == "anthropic":
        assert doc["type"] == "error" and doc["error"]["type"] == "authentication_error"
    elif shape == "gemini":
        assert doc["error"]["code"] == 401 and doc["error"]["status"] == "UNAUTHENTICATED"
    else:
        assert doc["error"]["code"] == "spendgate_no_key"
    assert "No Spendgate key" in doc["error"]["message"]


def test_byok_key_passes_the_clients_own_provider_key() -> None:
    ident, _ = make_identity()
    f = request("api.openai.com",
                headers={"Proxy-Authorization": basic("dev", BYOK_KEY), "Authorization": f"Bearer {FOREIGN}"})
    run(ident.requestheaders(f))
    assert f.response is None
    assert auth_headers(f) == [("authorization", f"Bearer {FOREIGN}")]
    assert f.metadata[META].byok_passthrough is True
    a = request("api.anthropic.com", "/v1/messages",
                {"x-api-key": FOREIGN, "Proxy-Authorization": basic("dev", BYOK_KEY)})
    run(ident.requestheaders(a))
    assert a.response is None and auth_headers(a) == [("x-api-key", FOREIGN)]


def test_missing_upstream_key_is_503() -> None:
    ident, _ = make_identity(upstream={"openai": "up-openai"})
    f = request("api.anthropic.com", "/v1/messages", {"x-api-key": KEY})
    run(ident.requestheaders(f))
    assert f.response is not None and f.response.status_code == 503
    assert "providers.anthropic.api_key" in f.response.text  # type: ignore[operator]
    assert auth_headers(f) == []


def test_unknown_ids_are_looked_up_once_a_second_not_per_request() -> None:
    ident, reg = make_identity()
    for _ in range(5):
        f = request("api.openai.com", headers={"Authorization": f"Bearer {UNKNOWN_KEY}"})
        run(ident.requestheaders(f))
        assert f.response is not None and f.response.status_code == 401
    assert reg.loads == ["nobody00"]


@pytest.mark.parametrize(
    ("proxy_auth", "status"),
    [(None, 407), ("Basic %%%", 407), (basic("dev", "hunter2"), 407), (basic("dev", UNKNOWN_KEY), 407),
     (basic("dev", REVOKED_KEY), 407), (basic("dev", EXPIRED_KEY), 407), (basic("dev", KEY), None)],
)
def test_connect_to_other_hosts_needs_valid_credentials(proxy_auth: str | None, status: int | None) -> None:
    ident, _ = make_identity()
    c = connect("example.com", 443, proxy_auth)
    run(ident.http_connect(c))
    if status is None:
        assert c.response is None
    else:
        assert c.response is not None and c.response.status_code == status
        assert c.response.headers["proxy-authenticate"].startswith("Basic")
        assert c.response.headers[REQUEST_ID_HEADER].startswith("sgr_")


def test_block_other_hosts_refuses_even_with_credentials() -> None:
    ident, _ = make_identity(block_other_hosts=True)
    c = connect("example.com", 443, basic("dev", KEY))
    run(ident.http_connect(c))
    assert c.response is not None and c.response.status_code == 403
    m = connect("api.openai.com", 443, basic("dev", KEY))
    run(ident.http_connect(m))
    assert m.response is None


def test_plain_http_to_other_hosts_needs_credentials() -> None:
    ident, _ = make_identity()
    f = request("example.com", "/", method="GET")
    f.client_conn.timestamp_tls_setup = None
    f.request.scheme = "http"
    run(ident.requestheaders(f))
    assert f.response is not None and f.response.status_code == 407
    g = request("example.com", "/", {"Proxy-Authorization": basic("dev", KEY)}, method="GET")
    g.client_conn.timestamp_tls_setup = None
    run(ident.requestheaders(g))
    assert g.response is None
