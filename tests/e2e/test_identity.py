"""Who is calling, through a real `spendgate serve`: every refusal of the contract's table as the SDKs
show it, the gateway is never an open proxy (other hosts need credentials and are not decrypted),
and garbage gets a clear answer without hurting the gateway.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from cryptography import x509

from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess
from tests.rig.mock_provider import MockProvider, content_pieces, generate_cert

MSGS = [{"role": "user", "content": "Say hello"}]
TEXT = "".join(content_pieces(5))
CLAUDE = "claude-sonnet-4-20250514"
MAX_BYTES = 1024
GEMINI_GENERATE = "/v1beta/models/gemini-2.0-flash:generateContent"
# Built at runtime: a leak scanner reads the source for provider-key-shaped literals.
FOREIGN_OPENAI = "sk-" + "proj" + "A" * 20 + "b" * 8
FOREIGN_ANTHROPIC = "sk-" + "ant-" + "api03" + "C" * 28


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider,
       origin: OriginServer) -> Iterator[GatewayProcess]:
    # The loopback origin stands in for a public host: loopback tunnels are refused unless named.
    allowed = [f"127.0.0.1:{origin.port}", f"localhost:{origin.port}"]
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-identity"), _mock_provider_session.url, name="identity",
                       overrides={"proxy": {"max_request_bytes": MAX_BYTES, "allow_destinations": allowed}})
    g.start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gw: GatewayProcess) -> None:
    request.node._spendgate_gateways = [gw]


@pytest.fixture(scope="module")
def keys(gw: GatewayProcess) -> dict[str, str]:
    """One key per case of the refusal table, minted once through the CLI."""
    past = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat(timespec="seconds")
    specs: dict[str, tuple[str, dict[str, Any]]] = {
        "alice": ("alice", {"team": "core"}),
        "mini": ("mini-only", {"models": ["gpt-4o-mini*", "claude-3-5-haiku-*"]}),
        "byok": ("byok-user", {"byok": True}),
        "expired": ("expired-user", {"expires": past}),
        "revoked": ("revoked-user", {}),
    }
    with ThreadPoolExecutor(len(specs)) as pool:  # each CLI call is its own process
        made = dict(zip(specs, pool.map(lambda s: gw.create_key(s[0], **s[1]), specs.values())))
    gw.revoke_key(made["revoked"]["key_id"])
    out = {name: str(m["key"]) for name, m in made.items()}
    key_id = out["alice"].split("_")[1]
    out["wrong_secret"] = f"sg_{key_id}_" + "W" * 43
    out["unknown"] = "sg_zz99zz99_" + "U" * 43
    out["malformed"] = "sg_not-a-key"
    return out


def assert_nothing_upstream(mock: MockProvider) -> None:
    assert mock.requests == [], [(r.method, r.path) for r in mock.requests]


def assert_alive(gw: GatewayProcess, key: str, mock: MockProvider) -> None:
    """The process is up and a normal request still works end to end."""
    assert gw.running
    mock.clear()
    r = gw.openai_client(key).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert r.choices[0].message.content == TEXT
    assert mock.last.headers["authorization"] == f"Bearer {UPSTREAM_KEYS['openai']}"


# --------------------------------------------------------------------------- the refusal table, as the SDKs show it

REFUSALS = [
    # (case, key name, status, code, openai exception, anthropic exception, text in the message)
    ("malformed", "malformed", 401, "spendgate_invalid_key", openai.AuthenticationError, anthropic.AuthenticationError,
     "not a valid Spendgate key"),
    ("unknown", "unknown", 401, "spendgate_unknown_key", openai.AuthenticationError, anthropic.AuthenticationError,
     "Unknown Spendgate key"),
    ("wrong-secret", "wrong_secret", 401, "spendgate_unknown_key", openai.AuthenticationError,
     anthropic.AuthenticationError, "Unknown Spendgate key"),
    ("revoked", "revoked", 403, "spendgate_key_revoked", openai.PermissionDeniedError, anthropic.PermissionDeniedError,
     "has been revoked"),
    ("expired", "expired", 403, "spendgate_key_expired", openai.PermissionDeniedError, anthropic.PermissionDeniedError,
     "expired"),
    ("model", "mini", 403, "spendgate_model_not_allowed", openai.PermissionDeniedError, anthropic.PermissionDeniedError,
     "is not allowed for key"),
]


@pytest.mark.parametrize("via", ["proxy", "apikey"])
@pytest.mark.parametrize(("case", "key_name", "status", "code", "oai_exc", "ant_exc", "text"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_refusals_through_the_sdks(gw: GatewayProcess, keys: dict[str, str], mock_provider: MockProvider,
                                   case: str, key_name: str, status: int, code: str, oai_exc: type[Exception],
                                   ant_exc: type[Exception], text: str, via: str) -> None:
    key = keys[key_name]
    with pytest.raises(oai_exc) as oi:
        gw.openai_client(key, via=via).chat.completions.create(model="gpt-4o", messages=MSGS)
    e = oi.value
    assert isinstance(e, openai.APIStatusError)
    assert e.status_code == status and e.code == code
    assert text in str(e)
    assert e.response.headers["x-spendgate-request-id"].startswith("sgr_")
    with pytest.raises(ant_exc) as ai:
        gw.anthropic_client(key, via=via).messages.create(model=CLAUDE, max_tokens=16, messages=MSGS)
    a = ai.value
    assert isinstance(a, anthropic.APIStatusError) and a.status_code == status
    assert text in str(a)
    assert a.body["type"] == "error" and text in a.body["error"]["message"]  # type: ignore[index]
    assert_nothing_upstream(mock_provider)


@pytest.mark.parametrize("via", ["proxy", "apikey"])
def test_allowed_models_admit_matching_names(gw: GatewayProcess, keys: dict[str, str], mock_provider: MockProvider,
                                             via: str) -> None:
    r = gw.openai_client(keys["mini"], via=via).chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=MSGS)
    assert r.choices[0].message.content == TEXT
    m = gw.anthropic_client(keys["mini"], via=via).messages.create(model="claude-3-5-haiku-20241022", max_tokens=16,
                                                                   messages=MSGS)
    assert m.content[0].text == TEXT  # type: ignore[union-attr]
    assert [r.model for r in mock_provider.wait_for(2)] == ["gpt-4o-mini-2024-07-18", "claude-3-5-haiku-20241022"]
    # a glob does not admit a model listed only as a prefix of another name
    with pytest.raises(openai.PermissionDeniedError, match="'gpt-4o' is not allowed"):
        gw.openai_client(keys["mini"], via=via).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert len(mock_provider.requests) == 2


def test_no_key_at_all(gw: GatewayProcess, mock_provider: MockProvider) -> None:
    """No credential anywhere: 401 in each provider's own error shape."""
    with gw.httpx_client(None) as c:
        o = c.post("https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS})
        a = c.post("https://api.anthropic.com/v1/messages", json={"model": CLAUDE, "max_tokens": 8, "messages": MSGS},
                   headers={"anthropic-version": "2023-06-01"})
        g = c.post(f"https://generativelanguage.googleapis.com{GEMINI_GENERATE}", json={"contents": []})
    assert (o.status_code, a.status_code, g.status_code) == (401, 401, 401)
    assert o.json()["error"]["code"] == "spendgate_no_key" and "No Spendgate key" in o.json()["error"]["message"]
    assert a.json()["type"] == "error" and a.json()["error"]["type"] == "authentication_error"
    assert "No Spendgate key" in a.json()["error"]["message"]
    assert g.json()["error"]["code"] == 401 and g.json()["error"]["status"] == "UNAUTHENTICATED"
    for r in (o, a, g):
        assert r.headers["x-spendgate-request-id"].startswith("sgr_")
    # curl, as a developer would first try it
    cp = gw.curl(["https://api.openai.com/v1/models", "-w", "\n%{http_code}"])
    body, _, status = cp.stdout.rpartition("\n")
    assert status == "401" and json.loads(body)["error"]["code"] == "spendgate_no_key"
    # an SDK that sends a placeholder key is told the same thing more precisely
    with pytest.raises(openai.AuthenticationError, match="not a valid Spendgate key"):
        gw.openai_client(None).models.list()
    assert_nothing_upstream(mock_provider)


def test_foreign_provider_key_is_refused(gw: GatewayProcess, keys: dict[str, str], mock_provider: MockProvider) -> None:
    # alone, and next to a valid gateway key in the proxy URL
    for proxy_key in (None, keys["alice"]):
        with pytest.raises(openai.PermissionDeniedError) as oi:
            gw.openai_client(proxy_key).with_options(api_key=FOREIGN_OPENAI).chat.completions.create(
                model="gpt-4o", messages=MSGS)
        assert oi.value.status_code == 403 and oi.value.code == "spendgate_foreign_key"
        assert "Provider API keys are not accepted" in str(oi.value)
        with pytest.raises(anthropic.PermissionDeniedError, match="Provider API keys are not accepted"):
            gw.anthropic_client(proxy_key).with_options(api_key=FOREIGN_ANTHROPIC).messages.create(
                model=CLAUDE, max_tokens=8, messages=MSGS)
    assert_nothing_upstream(mock_provider)


def test_byok_key_lets_the_clients_own_key_through(gw: GatewayProcess, keys: dict[str, str],
                                                   mock_provider: MockProvider) -> None:
    r = gw.openai_client(keys["byok"]).with_options(api_key=FOREIGN_OPENAI).chat.completions.create(
        model="gpt-4o", messages=MSGS)
    assert r.choices[0].message.content == TEXT
    m = gw.anthropic_client(keys["byok"]).with_options(api_key=FOREIGN_ANTHROPIC).messages.create(
        model=CLAUDE, max_tokens=8, messages=MSGS)
    assert m.content[0].text == TEXT  # type: ignore[union-attr]
    o, a = mock_provider.wait_for(2)
    assert o.headers["authorization"] == f"Bearer {FOREIGN_OPENAI}"
    assert a.headers["x-api-key"] == FOREIGN_ANTHROPIC and "authorization" not in a.headers
    for rec in (o, a):
        assert UPSTREAM_KEYS["openai"] not in str(rec.header_list)
        assert UPSTREAM_KEYS["anthropic"] not in str(rec.header_list)
        assert "sg_" not in str(rec.header_list)
    # without a foreign key the byok key behaves like any other: the team's key is used
    gw.openai_client(keys["byok"]).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert mock_provider.last.headers["authorization"] == f"Bearer {UPSTREAM_KEYS['openai']}"


# --------------------------------------------------------------------------- never an open proxy


class OriginServer:
    """A TLS server on 127.0.0.1 with its own self-signed certificate: some non-model HTTPS site."""

    def __init__(self, directory: Path) -> None:
        self.cert_path, key_path = generate_cert(directory)
        self.cert_der = ssl.PEM_cert_to_DER_cert(self.cert_path.read_text())
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(self.cert_path, key_path)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\norigin says")
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginServer]:
    o = OriginServer(tmp_path_factory.mktemp("origin"))
    yield o
    o.close()


def raw_connect(gw: GatewayProcess, target: str, proxy_auth: str | None) -> tuple[int, dict[str, str], socket.socket]:
    """Send a CONNECT by hand; returns (status, headers, the socket, left open)."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if proxy_auth is not None:
        head += f"Proxy-Authorization: {proxy_auth}\r\n"
    s.sendall((head + "\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    lines = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, s


def test_other_host_is_tunnelled_not_decrypted(gw: GatewayProcess, keys: dict[str, str], origin: OriginServer,
                                               mock_provider: MockProvider) -> None:
    before = origin.accepted
    status, _, s = raw_connect(gw, f"127.0.0.1:{origin.port}", basic("alice", keys["alice"]))
    assert status == 200
    # Trust ONLY the origin's own certificate: a gateway-minted one would fail this handshake.
    ctx = ssl.create_default_context(cafile=str(origin.cert_path))
    with ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls:
        peer = tls.getpeercert(binary_form=True)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert peer == origin.cert_der
    gateway_ca = x509.load_pem_x509_certificate(gw.ca_path.read_bytes())
    assert x509.load_der_x509_certificate(peer).issuer != gateway_ca.subject
    assert answer.endswith(b"origin says")
    assert origin.accepted == before + 1
    assert_nothing_upstream(mock_provider)


def test_other_host_with_an_sni_name_is_not_decrypted(gw: GatewayProcess, keys: dict[str, str],
                                                      origin: OriginServer) -> None:
    """Same through http.client, the way a Python tool tunnels, with SNI set to a non-model name."""
    ctx = ssl.create_default_context(cafile=str(origin.cert_path))
    ctx.check_hostname = False  # the origin's certificate names 127.0.0.1/localhost, not this name
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=ctx, timeout=10)
    conn.set_tunnel("localhost", origin.port, headers={"Proxy-Authorization": basic("alice", keys["alice"])})
    conn.connect()
    assert conn.sock is not None
    assert conn.sock.getpeercert(binary_form=True) == origin.cert_der
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"origin says"
    conn.close()


@pytest.mark.parametrize(
    "proxy_auth",
    [
        None,
        basic("alice", "hunter2"),
        basic("alice", "sg_zz99zz99_" + "U" * 43),
        "Basic !!!not-base64",
        "Bearer whatever",
        "revoked",
        "expired",
    ],
    ids=["none", "password", "unknown-key", "bad-base64", "bearer", "revoked-key", "expired-key"],
)
def test_other_host_without_valid_credentials_is_407(gw: GatewayProcess, keys: dict[str, str], origin: OriginServer,
                                                     proxy_auth: str | None) -> None:
    if proxy_auth in ("revoked", "expired"):
        proxy_auth = basic("x", keys[proxy_auth])
    before = origin.accepted
    status, headers, s = raw_connect(gw, f"127.0.0.1:{origin.port}", proxy_auth)
    s.close()
    assert status == 407
    assert headers["proxy-authenticate"].lower().startswith("basic")
    assert headers["x-spendgate-request-id"].startswith("sgr_")
    assert origin.accepted == before  # nothing was opened to the origin


def test_model_host_connect_without_credentials_gets_a_provider_shaped_answer(gw: GatewayProcess,
                                                                              mock_provider: MockProvider) -> None:
    """For model hosts the CONNECT is accepted so the SDK sees a readable 401, not a bare 407."""
    status, _, s = raw_connect(gw, "api.openai.com:443", None)
    assert status == 200
    with gw.ssl_context().wrap_socket(s, server_hostname="api.openai.com") as tls:
        tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401")
    assert b"spendgate_no_key" in answer
    assert_nothing_upstream(mock_provider)


# --------------------------------------------------------------------------- garbage in, clear answers out


def tunnel(gw: GatewayProcess, host: str, proxy_auth: str | None) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=gw.ssl_context(), timeout=15)
    conn.set_tunnel(host, 443, headers={"Proxy-Authorization": proxy_auth} if proxy_auth else None)
    return conn


def send(conn: http.client.HTTPSConnection, method: str, path: str, body: bytes | None = None,
         headers: list[tuple[str, bytes | str]] = ()) -> tuple[int, dict[str, str], bytes]:  # type: ignore[assignment]
    conn.putrequest(method, path)
    for k, v in headers:
        conn.putheader(k, v)
    if body is not None:
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


@pytest.mark.parametrize(
    "proxy_auth",
    ["Basic !!!not-base64", "Basic " + base64.b64encode(b"no-colon").decode(), "Digest username=alice",
     "Bearer sg_abcd1234_" + "x" * 43, basic("alice", "not-a-gateway-key")],
    ids=["bad-base64", "no-colon", "digest", "bearer", "no-gateway-key"],
)
def test_malformed_proxy_credentials(gw: GatewayProcess, keys: dict[str, str], mock_provider: MockProvider,
                                     proxy_auth: str) -> None:
    conn = tunnel(gw, "api.openai.com", proxy_auth)
    status, headers, body = send(conn, "POST", "/v1/chat/completions",
                                 json.dumps({"model": "gpt-4o", "messages": MSGS}).encode())
    conn.close()
    assert status == 401
    err = json.loads(body)["error"]
    assert err["code"] == "spendgate_bad_proxy_credentials" and "HTTPS_PROXY" in err["message"]
    assert headers["x-spendgate-request-id"].startswith("sgr_")
    assert_nothing_upstream(mock_provider)
    assert_alive(gw, keys["alice"], mock_provider)


GARBAGE: list[tuple[str, str, bytes]] = [
    ("authorization", "random-bytes", b"Bearer " + bytes(range(0x80, 0x100))),
    ("authorization", "long", b"Bearer " + b"A" * 16000),
    ("authorization", "empty-bearer", b"Bearer "),
    ("authorization", "sg-long", b"Bearer sg_abcd1234_" + b"a" * 5000),
    ("x-api-key", "random-bytes", bytes(range(0x80, 0x100))),
    ("x-api-key", "long", b"sg_" + b"Z" * 16000),
    ("x-goog-api-key", "control-chars", b"sg_\x01\x02\x7f"),
    ("api-key", "utf8", "sg_\u00e9\u00e8\u4e2d".encode()),
]


@pytest.mark.parametrize(("header", "value"), [(g[0], g[2]) for g in GARBAGE], ids=[f"{g[0]}-{g[1]}" for g in GARBAGE])
def test_garbage_in_the_api_key_header(gw: GatewayProcess, keys: dict[str, str], mock_provider: MockProvider,
                                       header: str, value: bytes) -> None:
    conn = tunnel(gw, "api.openai.com", None)
    status, headers, body = send(conn, "POST", "/v1/chat/completions",
                                 json.dumps({"model": "gpt-4o", "messages": MSGS}).encode(), [(header, value)])
    conn.close()
    assert status == 401
    err = json.loads(body)["error"]
    assert err["code"] in ("spendgate_invalid_key", "spendgate_no_key")
    assert "Spendgate key" in err["message"]
    assert headers["x-spendgate-request-id"].startswith("sgr_")
    assert_nothing_upstream(mock_provider)
    assert_alive(gw, keys["alice"], mock_provider)


@pytest.mark.parametrize(
    ("host", "path", "body"),
    [
        ("api.openai.com", "/v1/chat/completions", b"this is not json"),
        ("api.openai.com", "/v1/chat/completions", b"[1, 2, 3]"),
        ("api.openai.com", "/v1/embeddings", b'{"model": "text-embedding-3-small", "input": '),
        ("api.anthropic.com", "/v1/messages", b"\xff\xfe\x00garbage"),
        ("generativelanguage.googleapis.com", GEMINI_GENERATE, b"null"),
    ],
    ids=["text", "array", "truncated", "binary", "null"],
)
def test_non_json_body_on_a_model_endpoint(gw: GatewayProcess, keys: dict[str, str], mock_provider: MockProvider,
                                           host: str, path: str, body: bytes) -> None:
    conn = tunnel(gw, host, basic("alice", keys["alice"]))
    status, headers, answer = send(conn, "POST", path, body, [("anthropic-version", "2023-06-01")])
    conn.close()
    assert status == 400
    doc = json.loads(answer)
    assert "not a JSON object" in doc["error"]["message"]
    if host == "api.openai.com":
        assert doc["error"]["code"] == "spendgate_invalid_json"
    assert headers["x-spendgate-request-id"].startswith("sgr_")
    assert_nothing_upstream(mock_provider)
    assert_alive(gw, keys["alice"], mock_provider)


@pytest.mark.parametrize("via", ["proxy", "apikey"])
def test_unknown_path_is_governed_and_forwarded(gw: GatewayProcess, keys: dict[str, str], mock_provider: MockProvider,
                                                via: str) -> None:
    """No path skips identity: an unknown one is still attributed, re-keyed, and answered by the provider."""
    key = keys["alice"]
    headers = {"authorization": f"Bearer {key}"} if via == "apikey" else {}
    with gw.httpx_client(key if via == "proxy" else None) as c:
        r = c.post("https://api.openai.com/v1/does-not-exist", json={"x": 1}, headers=headers)
        g = c.get("https://api.openai.com/v1/files", headers=headers)
    first, second = mock_provider.wait_for(2)
    assert r.status_code == 404 and first.response_status == 404
    assert r.content == first.response_body  # the provider's own 404, byte for byte
    assert first.path == "/v1/does-not-exist"
    assert r.headers["x-spendgate-request-id"].startswith("sgr_")
    assert g.status_code == 404 and second.path == "/v1/files"
    for rec in (first, second):
        assert rec.headers["authorization"] == f"Bearer {UPSTREAM_KEYS['openai']}"
        assert "sg_" not in str(rec.header_list)
    # and without a key the same unknown path is refused before it goes anywhere
    mock_provider.clear()
    with gw.httpx_client(None) as c:
        n = c.post("https://api.openai.com/v1/does-not-exist", json={"x": 1})
    assert n.status_code == 401 and n.json()["error"]["code"] == "spendgate_no_key"
    assert_nothing_upstream(mock_provider)


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_over_max_request_bytes_is_413(gw: GatewayProcess, keys: dict[str, str], mock_provider: MockProvider,
                                            framing: str) -> None:
    big = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (MAX_BYTES * 4)}]}).encode()
    content: Any = big if framing == "content-length" else _chunks(big, 500)
    with gw.httpx_client(keys["alice"]) as c:
        r = c.post("https://api.openai.com/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "spendgate_request_too_large"
    assert str(MAX_BYTES) in r.json()["error"]["message"]
    assert r.headers["x-spendgate-request-id"].startswith("sgr_")
    with pytest.raises(openai.APIStatusError) as info:
        gw.openai_client(keys["alice"]).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "y" * (MAX_BYTES * 2)}])
    assert info.value.status_code == 413 and "at most 1024" in str(info.value)
    assert_nothing_upstream(mock_provider)
    assert_alive(gw, keys["alice"], mock_provider)


def test_gateway_survived_everything(gw: GatewayProcess, keys: dict[str, str], mock_provider: MockProvider) -> None:
    """Runs last in this module: the same process served every case above and still serves."""
    assert_alive(gw, keys["alice"], mock_provider)
    log = gw.log_text()
    assert "Traceback" not in log.split("spendgate serve starting")[-1]
