"""Where traffic may go and what a request may look like: the gateway's refusal rules.

Pure functions and values, no I/O: the stages (`routing`, `identity`, `policy`) and the proxy
layer (`edge`) apply them. The rules follow what careful forward proxies do by default (Squid's
`http_access` defaults: no tunnels to non-TLS ports, none to the proxy itself or to private
networks) and the contract's "Where traffic may go".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# The methods the providers' APIs use. Anything else on a model host is refused (405).
ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
MODEL_PORT = 443

# Refused destinations for tunnels (in addition to whatever is not globally routable).
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # CGNAT, RFC 6598
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


class Authority(NamedTuple):
    host: str  # normalised: lower case, no trailing dot, no IPv6 brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def normal_host(host: str) -> str:
    """Host names compare case-insensitively and `api.openai.com.` is `api.openai.com`.

    >>> normal_host("API.OpenAI.com.")
    'api.openai.com'
    """
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def parse_authority(value: str, default_port: int) -> Authority | None:
    """`host`, `host:port`, `[v6]` or `[v6]:port`; None when it is not an authority at all.

    >>> parse_authority("api.openai.com", 443)
    Authority(host='api.openai.com', port=443)
    >>> parse_authority("[::1]:8080", 443)
    Authority(host='::1', port=8080)
    """
    value = value.strip()
    if not value or any(c in value for c in "/?#@ \t\\"):
        return None
    host, port_s = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port_s = rest[1:]
    elif value.count(":") == 1:
        host, port_s = value.split(":")
        if not port_s:
            return None
    elif value.count(":") > 1:  # a bare IPv6 address
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return None
        host = value
    port = default_port
    if port_s:
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            return None
        port = int(port_s)
    host = normal_host(host)
    return Authority(host, port) if host else None


def misdirection(target: Authority, default_port: int, names: Iterable[tuple[str, str | None]]) -> str | None:
    """Why a request's own names disagree with where it is going, or None.

    `names` are (what, value) pairs: the Host header(s), the HTTP/2 `:authority` or absolute-form
    authority (with ports), and the TLS SNI (a bare host name). A disagreement means the client
    (or an attacker) wants one provider's governance while talking to another destination.
    """
    for what, value in names:
        if value is None or value == "":
            continue
        if what == "sni":
            if normal_host(value) != target.host:
                return f"the TLS SNI ({normal_host(value)}) is not {target.host}"
            continue
        got = parse_authority(value, default_port)
        if got is None:
            return f"the {what} ({value[:100]!r}) is not a host name"
        if got != target:
            return f"the {what} ({got}) is not {target}"
    return None


def refused_network(ip: IPAddress) -> str | None:
    """The kind of network a tunnel must not reach, or None for a public address.

    IPv4 addresses hidden in IPv6 forms (mapped, compatible, NAT64, 6to4) are judged as IPv4.

    >>> refused_network(ipaddress.ip_address("::ffff:169.254.169.254"))
    'link-local'
    >>> refused_network(ipaddress.ip_address("8.8.8.8")) is None
    True
    """
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is None and int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible ::a.b.c.d
            inner = ipaddress.IPv4Address(int(ip))
        if inner is not None:
            return refused_network(inner)
    if ip.is_unspecified:
        return "unspecified"  # 0.0.0.0 and :: reach this host on Linux
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"  # includes 169.254.169.254, the cloud metadata service
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared address space"
    if isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.ip_network("fc00::/7"):
        return "unique-local"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


@dataclass(frozen=True)
class Allowance:
    """One `[proxy] allow_destinations` entry: a network, a host name, either with or without a port."""

    network: IPNetwork | None
    host: str | None
    port: int | None

    def covers(self, host: str, ip: IPAddress | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        return self.host == host


def parse_destination(text: str) -> Allowance:
    """`10.1.2.0/24`, `10.1.2.3`, `10.1.2.3:5432`, `[fd00::1]:443`, `git.internal`, `git.internal:443`."""
    text = text.strip()
    if "/" in text:
        return Allowance(ipaddress.ip_network(text, strict=False), None, None)
    auth = parse_authority(text, 0)
    if auth is None:
        raise ValueError("expected a CIDR, an address, or host:port")
    port = auth.port or None
    try:
        ip = ipaddress.ip_address(auth.host)
    except ValueError:
        return Allowance(None, auth.host, port)
    return Allowance(ipaddress.ip_network(ip), None, port)


@dataclass(frozen=True)
class DestinationPolicy:
    """Which tunnels (and plain-HTTP requests) to non-model hosts may connect where.

    `own` are the gateway's own listening sockets (ip, port); an ip of None stands for every
    address of this machine (a wildcard listen address).
    """

    allow_ports: frozenset[int]
    exceptions: tuple[Allowance, ...]
    own_ports_any_address: frozenset[int]
    own: frozenset[tuple[IPAddress, int]]

    @classmethod
    def build(cls, allow_ports: Iterable[int], allow_destinations: Iterable[str],
              listens: Iterable[tuple[str, int]]) -> DestinationPolicy:
        own: set[tuple[IPAddress, int]] = set()
        any_addr: set[int] = set()
        for host, port in listens:
            try:
                ip = ipaddress.ip_address(normal_host(host))
            except ValueError:
                any_addr.add(port)  # a name: be safe, treat as every address of this machine
                continue
            if ip.is_unspecified:
                any_addr.add(port)
            else:
                own.add((ip, port))
        return cls(frozenset(allow_ports), tuple(parse_destination(d) for d in allow_destinations),
                   frozenset(any_addr), frozenset(own))

    def _excepted(self, host: str, ip: IPAddress | None, port: int, with_port: bool = False) -> bool:
        return any(e.covers(host, ip, port) and (e.port is not None or not with_port) for e in self.exceptions)

    def _port_ok(self, host: str, ip: IPAddress | None, port: int) -> bool:
        # A port outside allow_ports is fine only where an exception names that very port.
        return port in self.allow_ports or self._excepted(host, ip, port, with_port=True)

    def port_refusal(self, host: str, port: int) -> str | None:
        """Checked at CONNECT, before any DNS look-up. Network exceptions with a port are decided
        later, on the address."""
        host = normal_host(host)
        if self._port_ok(host, _ip_or_none(host), port):
            return None
        if any(e.port == port and e.network is not None for e in self.exceptions):
            return None
        allowed = ", ".join(map(str, sorted(self.allow_ports))) or "none"
        return f"port {port} is not allowed for tunnels (allowed: {allowed}; see [proxy] allow_ports)"

    def address_refusal(self, host: str, ip: IPAddress, port: int, local_ips: frozenset[IPAddress]) -> str | None:
        """Checked on the address actually connected to. `local_ips`: this machine's addresses."""
        host = normal_host(host)
        plain = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
        if (plain, port) in self.own or (port in self.own_ports_any_address
                                         and (plain in local_ips or plain.is_loopback or plain.is_unspecified)):
            return f"{host}:{port} is this gateway itself"
        if not self._port_ok(host, plain, port):
            allowed = ", ".join(map(str, sorted(self.allow_ports))) or "none"
            return f"port {port} is not allowed for tunnels (allowed: {allowed}; see [proxy] allow_ports)"
        kind = refused_network(ip)
        if kind is not None and not self._excepted(host, plain, port):
            return (f"{host} resolves to {ip}, a {kind} address; tunnels there are refused unless "
                    f"[proxy] allow_destinations names it")
        return None


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(normal_host(host))
    except ValueError:
        return None
