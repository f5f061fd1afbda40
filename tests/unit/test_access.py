"""The refusal rules (`spendgate.access`): authorities, misdirection, refused networks, tunnel policy."""

from __future__ import annotations

import ipaddress

import pytest

from spendgate.access import (
    Authority,
    DestinationPolicy,
    misdirection,
    parse_authority,
    parse_destination,
    refused_network,
)

TARGET = Authority("api.openai.com", 443)


@pytest.mark.parametrize(("value", "expected"), [
    ("api.openai.com", Authority("api.openai.com", 443)),
    ("API.OpenAI.COM.", Authority("api.openai.com", 443)),
    ("api.openai.com:8443", Authority("api.openai.com", 8443)),
    ("[::1]:80", Authority("::1", 80)),
    ("[::1]", Authority("::1", 443)),
    ("::1", Authority("::1", 443)),
    ("10.0.0.1:5432", Authority("10.0.0.1", 5432)),
    ("", None), ("host:99999", None), ("host:", None), ("a b", None), ("user@host", None), ("host/path", None),
    ("[::1", None), ("[::1]x", None),
])
def test_parse_authority(value: str, expected: Authority | None) -> None:
    assert parse_authority(value, 443) == expected


@pytest.mark.parametrize(("names", "wrong"), [
    ([("Host header", "api.openai.com")], None),
    ([("Host header", "API.OPENAI.COM.")], None),
    ([("Host header", "api.openai.com:443"), ("sni", "api.openai.com"), ("request authority", None)], None),
    ([("sni", "Api.OpenAI.com.")], None),
    ([("Host header", "")], None),
    ([("Host header", "evil.example")], "Host header"),
    ([("Host header", "api.openai.com:8443")], "Host header"),
    ([("Host header", "api.openai.com"), ("Host header", "evil.example")], "Host header"),
    ([("request authority", "evil.example")], "request authority"),
    ([("sni", "evil.example")], "sni"),
    ([("sni", "api.anthropic.com")], "sni"),
    ([("Host header", "api.openai.com@evil.example")], "not a host name"),
])
def test_misdirection(names: list[tuple[str, str | None]], wrong: str | None) -> None:
    got = misdirection(TARGET, 443, names)
    if wrong is None:
        assert got is None
    else:
        assert got is not None and wrong.lower() in got.lower()


@pytest.mark.parametrize(("ip", "kind"), [
    ("8.8.8.8", None), ("2606:4700::1111", None),
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "shared address space"), ("100.127.255.254", "shared address space"),
    ("fc00::1", "unique-local"), ("fd12:3456::1", "unique-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"), ("::ffff:10.0.0.1", "private"),
    ("64:ff9b::a00:1", "private"), ("2002:7f00:1::", "loopback"), ("::127.0.0.1", "loopback"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
])
def test_refused_network(ip: str, kind: str | None) -> None:
    assert refused_network(ipaddress.ip_address(ip)) == kind


def policy(allow_ports: tuple[int, ...] = (443,), allow: tuple[str, ...] = (),
           listens: tuple[tuple[str, int], ...] = (("127.0.0.1", 8080), ("0.0.0.0", 9464))) -> DestinationPolicy:
    return DestinationPolicy.build(allow_ports, allow, listens)


LOCAL = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("192.0.2.10")})


def refusal(p: DestinationPolicy, host: str, ip: str, port: int) -> str | None:
    return p.port_refusal(host, port) or p.address_refusal(host, ipaddress.ip_address(ip), port, LOCAL)


@pytest.mark.parametrize(("allow", "host", "ip", "port", "refused"), [
    ((), "example.com", "93.184.216.34", 443, None),
    ((), "example.com", "93.184.216.34", 22, "port 22"),
    ((), "example.com", "93.184.216.34", 80, "port 80"),
    ((), "intranet", "10.0.0.5", 443, "private"),
    ((), "rebound.example", "127.0.0.1", 443, "loopback"),
    ((), "metadata", "169.254.169.254", 443, "link-local"),
    (("10.0.0.0/8",), "intranet", "10.0.0.5", 443, None),
    (("10.0.0.0/8",), "intranet", "10.0.0.5", 22, "port 22"),  # a network exception does not open ports
    (("10.0.0.5:5432",), "db", "10.0.0.5", 5432, None),
    (("10.0.0.5:5432",), "db", "10.0.0.6", 5432, "port 5432"),
    (("git.internal:22",), "git.internal", "10.0.0.7", 22, None),
    (("git.internal:22",), "other.internal", "10.0.0.7", 22, "port 22"),
    (("git.internal",), "git.internal", "10.0.0.7", 443, None),
    (("127.0.0.0/8",), "localhost", "127.0.0.1", 8080, "this gateway"),  # never the gateway itself
    (("127.0.0.1:9464",), "x", "127.0.0.1", 9464, "this gateway"),
    (("192.0.2.0/24",), "me", "192.0.2.10", 9464, "this gateway"),  # wildcard listen: any local address
    (("192.0.2.0/24",), "me", "192.0.2.10", 443, None),
    (("10.0.0.0/8",), "mapped", "::ffff:10.0.0.5", 443, None),
])
def test_destination_policy(allow: tuple[str, ...], host: str, ip: str, port: int, refused: str | None) -> None:
    own_port = refused == "this gateway"  # open the port so that the gateway rule is what refuses
    p = policy(allow_ports=(443, port) if own_port else (443,), allow=allow)
    got = refusal(p, host, ip, port)
    if refused is None:
        assert got is None
    else:
        assert got is not None and refused in got, got


def test_allow_ports_widen_the_policy() -> None:
    assert refusal(policy(allow_ports=(443, 8443)), "example.com", "93.184.216.34", 8443) is None


@pytest.mark.parametrize("bad", ["", "host:0", "10.0.0.0/33", "::1::2", "user@host", "host/x"])
def test_bad_destinations_are_config_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_destination(bad)
