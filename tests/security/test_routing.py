"""Routing integrity: the CONNECT target (or an absolute-form URL's authority, without CONNECT)
fixes the provider and the destination. A Host header, an HTTP/2 ``:authority``, an
absolute-form URL inside the tunnel or a TLS SNI that disagrees is refused with 421; plain
``http://`` to a model host and a model host on a port other than 443 are refused with 403;
and the team's upstream key never goes to a host the client picked.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.rig.attacker import Listener
from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess
from tests.rig.hostile import (
    CALLS,
    HostileClient,
    assert_blocked_row,
    assert_nothing_reached,
    assert_provider_error,
    audit_row,
    request_id,
)
from tests.rig.leaks import SecretScan
from tests.rig.mock_provider import MockProvider
from tests.rig.rawclient import RawResponse, basic, h2_request


@dataclass(frozen=True)
class Mismatch:
    connect: str  # CONNECT target
    sni: str
    host: str  # Host header
    family: str  # the CONNECT target's provider: the shape of the refusal
    target: str | None = None  # request-line target (absolute-form); None: origin-form path


MISMATCHES = {
    "host-header": Mismatch("api.openai.com:443", "api.openai.com", "api.anthropic.com", "openai"),
    "host-header-with-port": Mismatch("api.openai.com:443", "api.openai.com", "api.anthropic.com:443", "openai"),
    "absolute-form-in-tunnel": Mismatch("api.openai.com:443", "api.openai.com", "api.anthropic.com", "openai",
                                        "https://api.anthropic.com/v1/chat/completions"),
    "absolute-form-in-tunnel-host-agrees": Mismatch("api.openai.com:443", "api.openai.com", "api.openai.com",
                                                    "openai", "https://api.anthropic.com/v1/chat/completions"),
    "sni": Mismatch("api.openai.com:443", "api.anthropic.com", "api.openai.com", "openai"),
    "sni-and-host": Mismatch("api.openai.com:443", "api.anthropic.com", "api.anthropic.com", "openai"),
    "anthropic-tunnel": Mismatch("api.anthropic.com:443", "api.anthropic.com", "api.openai.com", "anthropic"),
    "gemini-tunnel": Mismatch("generativelanguage.googleapis.com:443", "generativelanguage.googleapis.com",
                              "api.openai.com", "gemini"),
    "azure-other-resource": Mismatch("team.openai.azure.com:443", "team.openai.azure.com", "other.openai.azure.com",
                                     "openai"),
}
FAMILY_CALL = {"openai": CALLS["openai"], "anthropic": CALLS["anthropic"], "gemini": CALLS["gemini"]}


def _send_mismatch(client: HostileClient, m: Mismatch, auth: str | None) -> RawResponse:
    call = CALLS["azure"] if m.connect.startswith("team.openai.azure.com") else FAMILY_CALL[m.family]
    with client.tunnel(m.connect, sni=m.sni, auth=auth) as conn:
        return conn.exchange(call.raw(host=m.host, target=m.target))


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_host_sni_or_url_disagreeing_with_connect_is_421(gw: GatewayProcess, client: HostileClient, auth: str,
                                                          mock_provider: MockProvider, case: str) -> None:
    m = MISMATCHES[case]
    r = _send_mismatch(client, m, auth)
    assert_provider_error(r, m.family, 421, "spendgate_misdirected_request")
    assert_nothing_reached(mock_provider)
    assert_blocked_row(gw, r, 421)


def test_mismatch_without_a_key_is_refused_too(client: HostileClient, mock_provider: MockProvider) -> None:
    """No key at all must not make a disagreeing Host a way around identity (421, or 401 if identity runs first)."""
    r = _send_mismatch(client, MISMATCHES["host-header"], None)
    assert r.status in (401, 421), r.body[:300]
    assert_nothing_reached(mock_provider)


def test_h2_authority_disagreeing_with_connect_is_421(gw: GatewayProcess, client: HostileClient, auth: str,
                                                       mock_provider: MockProvider) -> None:
    call = CALLS["openai"]
    with client.tunnel("api.openai.com:443", auth=auth, alpn=["h2"]) as conn:
        assert conn.sock.selected_alpn_protocol() == "h2"  # type: ignore[attr-defined]
        r = h2_request(conn, [(":method", "POST"), (":scheme", "https"), (":authority", "api.anthropic.com"),
                              (":path", call.path), ("content-type", "application/json")], call.body)
    assert_provider_error(r, "openai", 421, "spendgate_misdirected_request")
    assert_nothing_reached(mock_provider)
    assert_blocked_row(gw, r, 421)


NAMED_IN_TUNNEL = {
    # (TLS SNI or None for plaintext inside the tunnel, Host header: "{attacker}" is the CONNECT target)
    "sni-and-host": ("api.openai.com", "api.openai.com"),
    "sni-only": ("api.openai.com", "{attacker}"),
    "plaintext-host": (None, "api.openai.com"),
}


@pytest.mark.parametrize("case", sorted(NAMED_IN_TUNNEL))
def test_non_model_connect_naming_a_model_host_is_421(client_allow: HostileClient, allow_key: str,
                                                      attacker: Listener, mock_provider: MockProvider,
                                                      case: str) -> None:
    """CONNECT to an allowed non-model host, but SNI or Host names a model host: decrypted to be refused."""
    sni, host = NAMED_IN_TUNNEL[case]
    host = host.format(attacker=attacker.address)
    auth = basic("mallory", allow_key)
    request = CALLS["openai"].raw(host=host)
    if sni is None:
        resp, conn = client_allow.connect(attacker.address, auth=auth)
        assert resp.status == 200, resp.body
        with conn:
            r = conn.exchange(request)
    else:
        with client_allow.tunnel(attacker.address, sni=sni, auth=auth) as conn:
            r = conn.exchange(request)
    assert_provider_error(r, "openai", 421, "spendgate_misdirected_request")
    assert_nothing_reached(mock_provider, attacker)


SAME_HOST = {
    # (CONNECT target, SNI, Host header)
    "upper-case-trailing-dot-connect": ("API.OPENAI.COM.:443", "api.openai.com", "api.openai.com"),
    "upper-case-trailing-dot-host": ("api.openai.com:443", "api.openai.com", "API.OpenAI.com."),
    "all-upper-case": ("API.OPENAI.COM.:443", "API.OPENAI.COM", "API.OpenAI.com."),
}


@pytest.mark.parametrize("case", sorted(SAME_HOST))
def test_case_and_trailing_dot_name_the_same_host(gw: GatewayProcess, client: HostileClient, auth: str,
                                                  mock_provider: MockProvider, case: str) -> None:
    target, sni, host = SAME_HOST[case]
    with client.tunnel(target, sni=sni, auth=auth, check_hostname=False) as conn:
        r = conn.exchange(CALLS["openai"].raw(host=host))
    assert r.status == 200, r.body[:300]
    (rec,) = mock_provider.wait_for(1)
    assert rec.headers["authorization"] == f"Bearer {UPSTREAM_KEYS['openai']}"
    row = audit_row(gw, request_id(r))
    assert (row["outcome"], row["provider"], row["status_code"]) == ("completed", "openai", 200)


PLAIN_HTTP = {
    # (how, request-line target, Host header, family)
    "absolute-form": ("direct", "http://api.openai.com/v1/chat/completions", "api.openai.com", "openai"),
    "absolute-form-port-443": ("direct", "http://api.openai.com:443/v1/chat/completions", "api.openai.com:443",
                               "openai"),
    "absolute-form-anthropic": ("direct", "http://api.anthropic.com/v1/messages", "api.anthropic.com", "anthropic"),
    "origin-form-to-the-proxy-port": ("origin", "/v1/chat/completions", "api.openai.com", "openai"),
    "plaintext-inside-connect-443": ("tunnel", "/v1/chat/completions", "api.openai.com", "openai"),
}


@pytest.mark.parametrize("case", sorted(PLAIN_HTTP))
def test_plain_http_to_a_model_host_is_403(client: HostileClient, key: str, auth: str, mock_provider: MockProvider,
                                           case: str) -> None:
    how, target, host, family = PLAIN_HTTP[case]
    call = FAMILY_CALL[family]
    if how == "tunnel":
        resp, conn = client.connect("api.openai.com:443", auth=auth)
        assert resp.status == 200
        request = call.raw(target=target, host=host)
    else:
        conn = client.direct()
        cred = ("Proxy-Authorization", auth) if how == "direct" else ("Authorization", f"Bearer {key}")
        request = call.raw(target=target, host=host, headers=[cred])
    with conn:
        r = conn.exchange(request)
    assert_provider_error(r, family, 403, "spendgate_tls_required")
    assert_nothing_reached(mock_provider)


@pytest.mark.parametrize("target", ["api.openai.com:8443", "api.openai.com:80", "api.anthropic.com:444",
                                    "API.OPENAI.COM.:8443"])
def test_connect_to_a_model_host_on_another_port_is_403(client: HostileClient, auth: str,
                                                         mock_provider: MockProvider, target: str) -> None:
    resp, conn = client.connect(target, auth=auth)
    conn.close()
    assert resp.status == 403, (resp.status, resp.body[:200])
    assert (resp.header("content-type") or "").startswith("text/plain"), resp.headers
    assert_nothing_reached(mock_provider)


ATTACKS = {
    # how the hostile user (holding a valid gateway key) tries to get the team's key sent to them
    "absolute-form-to-attacker-host-model": "direct",
    "absolute-form-to-attacker": "direct",
    "connect-attacker-sni-model": "tunnel",
    "connect-attacker-plaintext-host-model": "plaintext",
    "connect-model-absolute-form-to-attacker": "model-tunnel",
    "connect-model-host-attacker": "model-tunnel",
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_team_key_never_goes_to_a_host_of_the_users_choosing(gw_allow: GatewayProcess, client_allow: HostileClient,
                                                             allow_key: str, attacker: Listener, scan: SecretScan,
                                                             mock_provider: MockProvider, case: str) -> None:
    auth = basic("mallory", allow_key)
    att = attacker.address
    call = CALLS["openai"]
    if case == "absolute-form-to-attacker-host-model":
        request = call.raw(target=f"http://{att}{call.path}", headers=[("Proxy-Authorization", auth)])
    elif case == "absolute-form-to-attacker":
        request = call.raw(target=f"http://{att}{call.path}", host=att, headers=[("Proxy-Authorization", auth)])
    elif case == "connect-model-absolute-form-to-attacker":
        request = call.raw(target=f"https://{att}{call.path}", host=att)
    elif case == "connect-model-host-attacker":
        request = call.raw(host=att)
    else:
        request = call.raw()
    if ATTACKS[case] == "direct":
        conn = client_allow.direct()
    elif ATTACKS[case] == "tunnel":
        conn = client_allow.tunnel(att, sni="api.openai.com", auth=auth)
    elif ATTACKS[case] == "plaintext":
        resp, conn = client_allow.connect(att, auth=auth)
        assert resp.status == 200, resp.body
    else:
        conn = client_allow.tunnel("api.openai.com:443", auth=auth)
    with conn:
        conn.exchange(request)
    for provider, upstream_key in UPSTREAM_KEYS.items():
        assert not attacker.saw(upstream_key), f"the attacker received the team's {provider} key"
    assert not attacker.saw(allow_key), "the attacker received the user's gateway key"
    assert not scan.leaks(attacker.received)
