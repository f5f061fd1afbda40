"""Where a tunnel to a non-model host may go, with valid proxy credentials.

``allow_ports`` (default ``[443]``) and the refused networks (loopback, private, link-local,
shared-address, unique-local, multicast, unspecified, and their IPv4-mapped IPv6 forms, plus
the gateway's own listen addresses) answer 403 unless ``allow_destinations`` names the place.
The check is on the address actually connected to, so other spellings of loopback are refused
too. Where a listener stands at the refused address, it must see no connection at all.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

import pytest

from tests.rig.attacker import Listener
from tests.rig.gateway import GatewayProcess
from tests.rig.hostile import HostileClient, assert_nothing_reached
from tests.rig.leaks import SecretScan
from tests.rig.mock_provider import MockProvider
from tests.rig.rawclient import HTTP1, basic, http1_request, start_tls

# Built at runtime so no scanner mistakes it for a real secret; the final scan looks for it.
EVE_PASSWORD = "eve-proxy-" + "password-" + "Qx7" * 6

UNROUTED = [
    "10.0.0.1:443", "172.16.0.1:443", "192.168.1.1:443", "169.254.169.254:443", "100.64.0.1:443",
    "0.0.0.0:443", "224.0.0.1:443", "255.255.255.255:443", "[fc00::1]:443", "[fd12:3456::1]:443",
    "[fe80::1]:443", "[ff02::1]:443", "[::]:443", "[::ffff:10.0.0.1]:443", "[::ffff:169.254.169.254]:443",
    "[::ffff:192.168.1.1]:443",
]


@pytest.mark.parametrize("target", UNROUTED)
def test_tunnel_to_a_refused_network_is_403(client_allow: HostileClient, allow_key: str, target: str) -> None:
    """Nothing is sent after the CONNECT, so even a gateway that would connect opens nothing here."""
    t0 = time.monotonic()
    resp, conn = client_allow.connect(target, auth=basic("mallory", allow_key), timeout=5)
    conn.close()
    assert resp.status == 403, (resp.status, resp.body[:200])
    assert time.monotonic() - t0 < 3, "refusing must not wait for a connection attempt"


# (CONNECT target, the listener standing there or None for the gateway's own ports)
LOOPBACK: dict[str, Callable[[dict[str, Listener], GatewayProcess], tuple[str, Listener | None]]] = {
    "127.0.0.1": lambda ls, g: (f"127.0.0.1:{ls['v4'].port}", ls["v4"]),
    "localhost": lambda ls, g: (f"localhost:{ls['v4'].port}", ls["v4"]),
    "127.1": lambda ls, g: (f"127.1:{ls['v4'].port}", ls["v4"]),
    "decimal-2130706433": lambda ls, g: (f"2130706433:{ls['v4'].port}", ls["v4"]),
    "ipv4-mapped-ipv6": lambda ls, g: (f"[::ffff:127.0.0.1]:{ls['v4'].port}", ls["v4"]),
    "::1": lambda ls, g: (f"[::1]:{ls['v6'].port}", ls["v6"]),
    "::1-long-form": lambda ls, g: (f"[0:0:0:0:0:0:0:1]:{ls['v6'].port}", ls["v6"]),
    "own-proxy-port": lambda ls, g: (f"127.0.0.1:{g.port}", None),
    "own-metrics-port": lambda ls, g: (f"127.0.0.1:{g.metrics_port}", None),
    "own-metrics-port-localhost": lambda ls, g: (f"localhost:{g.metrics_port}", None),
}


def _probe(conn: HTTP1) -> None:
    """After a (wrong) 200, start TLS as a tunnelling client would, so a gateway that would connect does."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn.sock.settimeout(2)
    try:
        ctx.wrap_socket(conn.sock).close()
    except OSError:  # ssl.SSLError included
        pass


@pytest.mark.parametrize("case", sorted(LOOPBACK))
def test_tunnel_to_loopback_is_403_and_connects_nothing(gw_allow: GatewayProcess, client_allow: HostileClient,
                                                        allow_key: str, loopback: Listener, loopback6: Listener,
                                                        case: str) -> None:
    target, listener = LOOPBACK[case]({"v4": loopback, "v6": loopback6}, gw_allow)
    resp, conn = client_allow.connect(target, auth=basic("mallory", allow_key))
    with conn:
        if resp.status == 200:
            _probe(conn)
    # Numeric spellings mitmproxy cannot parse as a host may be refused as a bad request instead.
    allowed = (403, 400) if case.startswith("decimal") else (403,)
    assert resp.status in allowed, (resp.status, resp.body[:200])
    if listener is not None:
        assert listener.connections == 0, f"the gateway connected to {listener.address}"


def test_port_not_in_allow_ports_is_403(client_allow: HostileClient, allow_key: str, cidr_bad_port: Listener) -> None:
    """127.0.0.3 is an allowed network (CIDR), but this port is not an allowed port."""
    resp, conn = client_allow.connect(cidr_bad_port.address, auth=basic("mallory", allow_key))
    with conn:
        if resp.status == 200:
            _probe(conn)
    assert resp.status == 403, (resp.status, resp.body[:200])
    assert cidr_bad_port.connections == 0


@pytest.mark.parametrize("target", ["203.0.113.7:8443", "203.0.113.7:22", "203.0.113.7:80"])
def test_public_address_on_another_port_is_403(client_allow: HostileClient, allow_key: str, target: str) -> None:
    resp, conn = client_allow.connect(target, auth=basic("mallory", allow_key), timeout=5)
    conn.close()
    assert resp.status == 403, (resp.status, resp.body[:200])


@pytest.mark.parametrize("which", ["ip-port-entry", "cidr-entry"])
def test_tunnel_to_an_allowed_destination_works(client_allow: HostileClient, allow_key: str, origin: Listener,
                                                cidr_ok: Listener, mock_provider: MockProvider, which: str) -> None:
    """Not decrypted: the client sees the destination's own certificate."""
    dest = origin if which == "ip-port-entry" else cidr_ok
    resp, conn = client_allow.connect(dest.address, auth=basic("mallory", allow_key))
    assert resp.status == 200, (resp.status, resp.body[:200])
    with start_tls(conn, cafile=dest.cert_path, server_hostname="127.0.0.1", check_hostname=False) as tls:
        assert tls.sock.getpeercert(binary_form=True) == dest.cert_der  # type: ignore[attr-defined]
        r = tls.exchange(http1_request("GET", "/", [("Host", dest.address)]))
    assert (r.status, r.body) == (200, b"listener ok")
    assert dest.connections == 1
    assert_nothing_reached(mock_provider)


PLAIN_REFUSED: dict[str, Callable[[Listener, Listener, GatewayProcess], tuple[str, Listener | None]]] = {
    "127.0.0.1": lambda v4, v6, g: (f"http://127.0.0.1:{v4.port}/", v4),
    "localhost": lambda v4, v6, g: (f"http://localhost:{v4.port}/", v4),
    "::1": lambda v4, v6, g: (f"http://[::1]:{v6.port}/", v6),
    "own-metrics": lambda v4, v6, g: (f"http://127.0.0.1:{g.metrics_port}/metrics", None),
}


@pytest.mark.parametrize("case", sorted(PLAIN_REFUSED))
def test_plain_http_proxying_follows_the_same_policy(gw_allow: GatewayProcess, client_allow: HostileClient,
                                                     allow_key: str, loopback: Listener, loopback6: Listener,
                                                     case: str) -> None:
    url, listener = PLAIN_REFUSED[case](loopback, loopback6, gw_allow)
    with client_allow.direct() as conn:
        r = conn.exchange(http1_request("GET", url, [("Host", url.split("/")[2]),
                                                     ("Proxy-Authorization", basic("mallory", allow_key))]))
    assert r.status == 403, (r.status, r.body[:200])
    assert b"# HELP" not in r.body, "the gateway's own metrics came back"
    if listener is not None:
        assert listener.connections == 0


def test_plain_http_proxying_to_an_allowed_destination_works(client_allow: HostileClient, allow_key: str,
                                                             origin: Listener) -> None:
    with client_allow.direct() as conn:
        headers = [("Host", origin.address), ("Proxy-Authorization", basic("mallory", allow_key))]
        r = conn.exchange(http1_request("GET", f"http://{origin.address}/", headers))
    assert (r.status, r.body) == (200, b"listener ok")
    assert origin.connections == 1
    assert b"Proxy-Authorization" not in origin.received and allow_key.encode() not in origin.received


@pytest.mark.parametrize("password", [None, "eve", "unknown-key"])
def test_non_model_connect_without_valid_credentials_is_407(client_allow: HostileClient, origin: Listener,
                                                            scan: SecretScan, password: str | None) -> None:
    scan.add_secret("proxy password of eve", EVE_PASSWORD)
    auth = {None: None, "eve": basic("eve", EVE_PASSWORD),
            "unknown-key": basic("eve", "sg_zz99zz99_" + "U" * 43)}[password]
    resp, conn = client_allow.connect(origin.address, auth=auth)
    with conn:
        if resp.status == 200:
            _probe(conn)
    assert resp.status == 407, (resp.status, resp.body[:200])
    assert origin.connections == 0
