"""Routing and destinations: the provider is fixed by where the request goes, not by what it says,
and tunnels to other hosts reach only allowed addresses (the address actually connected to)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from typing import Any

import pytest
from mitmproxy import connection
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import tflow as mtflow
from mitmproxy.test import tutils

from spendgate.access import DestinationPolicy
from spendgate.settings import parse_settings
from spendgate.stages.call import Outcome, get_call
from spendgate.stages.routing import Destinations, EdgeAnswers, Routes, Routing, connect_targets
from spendgate.testing import tflow

SETTINGS = parse_settings({"providers": {"mistral": {"upstream": "https://127.0.0.1:9443"}}}, {})
ROUTES = Routes(SETTINGS.providers)


def connect(host: str, port: int, routing: Routing) -> Any:
    req = tutils.treq(method=b"CONNECT", host=host, port=port, scheme=b"", authority=f"{host}:{port}".encode(),
                      path=b"", headers=tutils.tresp().headers.copy(), content=b"")
    f = mtflow.tflow(req=req)
    routing.http_connect(f)
    return f


def code(f: Any) -> tuple[int, str]:
    assert f.response is not None
    return f.response.status_code, json.loads(f.response.content)["error"].get("code", "")


def test_a_request_in_its_own_tunnel_is_governed_by_that_provider() -> None:
    routing = Routing(ROUTES.provider_for, connect_targets())
    c = connect("API.OpenAI.com.", 443, routing)
    f = tflow()
    f.client_conn = c.client_conn
    f.client_conn.sni = "api.openai.com"
    routing.requestheaders(f)
    call = get_call(f)
    assert f.response is None and call is not None and call.provider.name == "openai" and call.host == "api.openai.com"


@pytest.mark.parametrize(("connect_to", "host_header", "sni"), [
    ("api.openai.com", "evil.example", "api.openai.com"),
    ("api.openai.com", "api.anthropic.com", "api.openai.com"),
    ("api.openai.com", "api.openai.com:8443", "api.openai.com"),
    ("api.openai.com", "api.openai.com", "evil.example"),
    ("evil.example", "api.openai.com", "evil.example"),
    ("evil.example", "evil.example", "api.openai.com"),
], ids=["host-elsewhere", "host-other-provider", "host-other-port", "sni-elsewhere", "tunnel-elsewhere-host-model",
        "tunnel-elsewhere-sni-model"])
def test_names_that_disagree_with_the_tunnel_are_421(connect_to: str, host_header: str, sni: str) -> None:
    routing = Routing(ROUTES.provider_for, connect_targets())
    c = connect(connect_to, 443, routing)
    f = tflow(connect_to if ROUTES.is_model_host(connect_to) else "api.openai.com")
    f.client_conn = c.client_conn
    f.client_conn.sni = sni
    f.request.headers["host"] = host_header
    routing.requestheaders(f)
    assert code(f) == (421, "spendgate_misdirected_request")
    call = get_call(f)
    assert call is not None and call.outcome is Outcome.BLOCKED_POLICY


def test_plain_http_to_a_model_host_is_403() -> None:
    routing = Routing(ROUTES.provider_for, connect_targets())
    f = tflow()
    f.request.scheme = "http"
    f.request.port = 80
    f.client_conn.timestamp_tls_setup = None  # not a TLS connection
    routing.requestheaders(f)
    assert code(f) == (403, "spendgate_tls_required")


def test_a_connect_to_a_model_host_on_another_port_is_refused() -> None:
    routing = Routing(ROUTES.provider_for, connect_targets())
    c = connect("api.openai.com", 8443, routing)
    assert c.response is not None and c.response.status_code == 403 and b"port 443" in c.response.content
    assert connect("api.openai.com", 443, routing).response is None


def test_methods_no_provider_uses_are_405() -> None:
    routing = Routing(ROUTES.provider_for, connect_targets())
    f = tflow(method="TRACE")
    routing.requestheaders(f)
    assert code(f) == (405, "spendgate_method_not_allowed")
    assert f.response is not None and "POST" in f.response.headers["allow"]


@pytest.mark.parametrize(("path", "refused"), [
    ("/openai/deployments/gpt-4o-mini/../gpt-4.1/chat/completions", True),
    ("/openai/deployments/gpt-4o-mini/%2E%2E/gpt-4.1/chat/completions", True),
    ("/openai/deployments/gpt-4o-mini%2F..%2Fgpt-4.1/chat/completions", True),
    ("/openai/deployments/gpt-4o-mini%5C..%5Cgpt-4.1/chat/completions", True),  # IIS reads \ as /
    ("/v1beta/models/gemini-2.0-flash:generateContent/%252e%252e/gemini-2.5-pro:generateContent", True),
    ("/v1/./chat/completions", True),
    ("/v1/chat/completions?next=/../x", False),  # the query is not the path
    ("/v1/files/file-..abc/content", False),
    ("/v1/models/...", False),
])
def test_a_path_an_upstream_would_resolve_elsewhere_is_400(path: str, refused: bool) -> None:
    """The model is read from the path (Azure deployments, Gemini): `..` must not move it at the upstream."""
    routing = Routing(ROUTES.provider_for, connect_targets())
    f = tflow(path=path)
    routing.requestheaders(f)
    if refused:
        assert code(f) == (400, "spendgate_invalid_path")
    else:
        assert f.response is None


def test_other_hosts_are_not_routing_s_business() -> None:
    routing = Routing(ROUTES.provider_for, connect_targets())
    f = tflow("example.com")
    routing.requestheaders(f)
    assert f.response is None and get_call(f) is None


def destinations(allow: tuple[str, ...] = ()) -> Destinations:
    policy = DestinationPolicy.build((443,), allow, [("127.0.0.1", 8080), ("127.0.0.1", 9464)])
    local = frozenset({ipaddress.ip_address("127.0.0.1")})
    return Destinations(policy, ROUTES.provider_for, ROUTES.model_upstream, local, connect_targets())


def server_connect(d: Destinations, host: str, port: int) -> connection.Server:
    server = connection.Server(address=(host, port))
    asyncio.run(d.server_connect(ServerConnectionHookData(server=server, client=mtflow.tclient_conn())))
    return server


def test_the_team_keys_go_only_to_provider_hosts_and_configured_upstreams() -> None:
    d = destinations()
    assert server_connect(d, "127.0.0.1", 9443).error is None  # mistral's configured upstream (loopback, allowed)
    assert server_connect(d, "api.openai.com", 443).error is None  # a provider's own host (no DNS: not looked up)
    assert "port 443 only" in (server_connect(d, "api.openai.com", 8443).error or "")


@pytest.mark.parametrize(("host", "port", "refused"), [
    ("127.0.0.1", 443, "loopback"), ("169.254.169.254", 443, "link-local"), ("10.0.0.1", 443, "private"),
    ("93.184.216.34", 22, "port 22"), ("127.0.0.1", 8080, "port 8080"), ("::ffff:127.0.0.1", 443, "loopback"),
])
def test_tunnels_to_refused_destinations_never_connect(host: str, port: int, refused: str) -> None:
    assert refused in (server_connect(destinations(), host, port).error or "")


def test_an_allowed_name_is_connected_to_the_address_that_was_checked() -> None:
    server = server_connect(destinations(("localhost:443",)), "localhost", 443)
    assert server.error is None and server.address is not None
    assert ipaddress.ip_address(server.address[0]).is_loopback  # pinned: no second look-up at connect time


def test_edge_answers_are_the_providers_own_shape() -> None:
    f = tflow()
    Routing(ROUTES.provider_for, connect_targets()).requestheaders(f)
    call = get_call(f)
    assert call is not None
    EdgeAnswers().refuse_too_large(f, 1024)
    assert code(f) == (413, "spendgate_request_too_large")
    answer = EdgeAnswers().upstream_failed(f, 504, "spendgate_upstream_timeout", "slow", final=True)
    assert answer.status_code == 504 and call.outcome is Outcome.UPSTREAM_ERROR and call.status_code == 504


def test_request_ids_are_unique_and_in_time_order() -> None:
    """The audit log's primary key: ids of later requests sort after earlier ones (each insert lands
    on the index's last page), and ids from the same millisecond still differ."""
    from spendgate.stages.call import new_request_id

    first = new_request_id()
    burst = [new_request_id() for _ in range(10_000)]
    time.sleep(0.002)
    later = new_request_id()
    assert len(set(burst)) == len(burst)
    assert all(len(i) == 28 and i.startswith("sgr_") and int(i[4:], 16) >= 0 for i in burst)
    assert first[:16] <= min(burst)[:16] and max(burst) < later
