"""Stages: where a request goes, decided before anything it says is believed.

`Routing` fixes the provider and destination of a model-host request from the CONNECT target
(or, without a CONNECT, from the URL's authority) and refuses a request whose Host,
`:authority` or TLS SNI names anything else (421), a model host over plain HTTP (403), a CONNECT
to a model host on another port than 443, methods no provider uses (405), and paths with `.` / `..`
segments, which an upstream would resolve to another model than the one the path names (400).
`Destinations` decides where tunnels and plain-HTTP requests to other hosts may connect, on the
address actually connected to. The rules themselves live in `spendgate.access`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import weakref
from collections.abc import Callable
from typing import Iterable
from urllib.parse import unquote

from mitmproxy import connection, http
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from spendgate.access import (
    ALLOWED_METHODS,
    MODEL_PORT,
    Authority,
    DestinationPolicy,
    IPAddress,
    misdirection,
    normal_host,
    parse_authority,
)
from spendgate.providers import HostMatcher
from spendgate.settings import ProviderSettings
from spendgate.stages.call import (
    META,
    Call,
    Outcome,
    get_call,
    new_request_id,
    plain_response,
    refusal_response,
    refuse,
)

log = logging.getLogger(__name__)

ProviderFor = Callable[[str], ProviderSettings | None]


class Routes:
    """The configured providers by host, and the only addresses the team's keys may be sent to."""

    def __init__(self, providers: Iterable[ProviderSettings]) -> None:
        self._providers = {p.name: p for p in providers}
        self._hosts = HostMatcher({h: p.name for p in self._providers.values() for h in p.hosts})
        self._upstreams = frozenset((p.upstream.host, p.upstream.port) for p in self._providers.values()
                                    if p.upstream is not None)
        self._insecure = frozenset((p.upstream.host, p.upstream.port) for p in self._providers.values()
                                   if p.upstream is not None and not p.verify_upstream_tls)

    def provider_for(self, host: str) -> ProviderSettings | None:
        name = self._hosts.match(host)
        return self._providers.get(name) if name else None

    def is_model_host(self, host: str) -> bool:
        return self._hosts.match(host) is not None

    def model_upstream(self, address: tuple[str, int]) -> bool:
        """A configured `upstream`, or a provider's own host on 443: the only places the team's keys go."""
        host, port = address
        if (host, port) in self._upstreams:
            return True
        return port == MODEL_PORT and self._hosts.match(host) is not None

    def verify_upstream(self, host: str, port: int) -> bool:
        return (host, port) not in self._insecure


def connect_targets() -> weakref.WeakKeyDictionary[connection.Client, Authority]:
    return weakref.WeakKeyDictionary()


class Routing:
    def __init__(self, provider_for: ProviderFor,
                 targets: weakref.WeakKeyDictionary[connection.Client, Authority]) -> None:
        self.provider_for = provider_for
        self.targets = targets  # per client connection: where its CONNECT went

    def http_connect(self, flow: http.HTTPFlow) -> None:
        target = Authority(normal_host(flow.request.host), flow.request.port)
        self.targets[flow.client_conn] = target
        if self.provider_for(target.host) is not None and target.port != MODEL_PORT:
            log.info("refused CONNECT %s from %s: model hosts are reached on port 443 only", target, _peer(flow))
            flow.response = plain_response(403, f"{target.host} is a model API host: the gateway reaches it on "
                                                "port 443 only.")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        req = flow.request
        target = self.targets.get(flow.client_conn) or Authority(normal_host(req.host), req.port)
        tls = flow.client_conn.tls_established
        names: list[tuple[str, str | None]] = [("Host header", h) for h in req.headers.get_all("host")]
        names.append(("request authority", req.authority or None))
        if tls:
            names.append(("sni", flow.client_conn.sni))
        provider = self.provider_for(target.host)
        if provider is None:
            provider = _first_named_provider(self.provider_for, names)
            if provider is None:
                return  # neither where it goes nor what it says is a model host: not ours to govern
        call = Call(request_id=new_request_id(), provider=provider, host=target.host,
                    client_addr=flow.client_conn.peername[0] if flow.client_conn.peername else None,
                    user_agent=req.headers.get("user-agent"))
        flow.metadata[META] = call
        to_model_host = self.provider_for(target.host) is not None
        wrong = None if (to_model_host and not tls) else misdirection(target, MODEL_PORT if tls else 80, names)
        if wrong is None and not to_model_host:
            wrong = f"{target} is not a {provider.name} host"
        if wrong is not None:
            log.info("refused %s %s from %s: misdirected (%s)", req.method, target, _peer(flow), wrong)
            refuse(flow, call, 421, "spendgate_misdirected_request",
                   f"Misdirected request: {wrong}. Send requests for {target.host} to {target.host} itself, "
                   "through a CONNECT to that host.", Outcome.BLOCKED_POLICY)
        elif not tls:
            log.info("refused plain-HTTP %s %s from %s", req.method, target, _peer(flow))
            refuse(flow, call, 403, "spendgate_tls_required",
                   f"Plain http:// to {target.host} is refused: use https://{target.host} (the gateway decrypts it "
                   "itself).", Outcome.BLOCKED_POLICY)
        elif req.method.upper() not in ALLOWED_METHODS:
            refuse(flow, call, 405, "spendgate_method_not_allowed",
                   f"Method {req.method[:20]!r} is not used by {provider.name}'s API.", Outcome.BLOCKED_POLICY,
                   headers={"allow": ", ".join(sorted(ALLOWED_METHODS))})
        elif dot_segments(req.path):
            # The gateway reads the model from the path (Azure deployments, Gemini): an upstream that
            # resolves `..` would answer for another model than the one checked and priced.
            refuse(flow, call, 400, "spendgate_invalid_path",
                   "The request path has '.' or '..' segments; send it resolved.", Outcome.BLOCKED_POLICY)


def dot_segments(path: str) -> bool:
    """`path` has `.` / `..` segments (RFC 3986 5.2.4), however encoded or separated (`%2E`, `%2F`, `\\`)."""
    bare = path.split("?", 1)[0]
    for _ in range(3):  # double encoding too
        if any(seg in (".", "..") for seg in re.split(r"[/\\]", bare)):
            return True
        decoded = unquote(bare)
        if decoded == bare:
            return False
        bare = decoded
    return True  # encoded more deeply than any client encodes a path


def _first_named_provider(provider_for: ProviderFor,
                          names: Iterable[tuple[str, str | None]]) -> ProviderSettings | None:
    """A request that goes elsewhere but names a model host still gets that provider's refusal."""
    for _, value in names:
        if value:
            auth = parse_authority(value, MODEL_PORT)
            found = provider_for(auth.host) if auth else None
            if found is not None:
                return found
    return None


def _peer(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    return f"{peer[0]}:{peer[1]}" if peer else "?"


class EdgeAnswers:
    """What `spendgate.edge` answers for the refusals it makes below the hooks."""

    def refuse_too_large(self, flow: http.HTTPFlow, limit: int) -> None:
        message = (f"Request body is over {limit} bytes; "
                   f"this gateway accepts at most {limit} ([proxy] max_request_bytes).")
        call = get_call(flow)
        if call is None:
            flow.response = plain_response(413, message)
        else:
            refuse(flow, call, 413, "spendgate_request_too_large", message, Outcome.BLOCKED_POLICY)

    def upstream_failed(self, flow: http.HTTPFlow, status: int, code: str, message: str, final: bool) -> http.Response:
        call = get_call(flow)
        if call is None:
            return plain_response(status, message)
        if final:
            call.outcome, call.status_code, call.error = Outcome.UPSTREAM_ERROR, status, message
        return refusal_response(call, status, code, message)


class Destinations:
    """Tunnels and plain-HTTP requests to hosts that are not model APIs: only allowed destinations,
    checked on the resolved address, and connected to exactly that address (no DNS rebinding)."""

    def __init__(self, policy: DestinationPolicy, provider_for: ProviderFor,
                 model_upstream: Callable[[tuple[str, int]], bool], local_ips: frozenset[IPAddress],
                 targets: weakref.WeakKeyDictionary[connection.Client, Authority]) -> None:
        self.policy = policy
        self.provider_for = provider_for
        self.model_upstream = model_upstream
        self.local_ips = local_ips
        self.targets = targets

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        target = Authority(normal_host(flow.request.host), flow.request.port)
        if self.provider_for(target.host) is not None:
            return
        refusal = await self.refusal(target)
        if refusal is not None:
            log.info("refused CONNECT %s from %s: %s", target, _peer(flow), refusal)
            flow.response = plain_response(403, refusal + ".")

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Plain-HTTP proxying of other hosts follows the tunnel policy."""
        if flow.response is not None or get_call(flow) is not None or flow.client_conn in self.targets:
            return
        target = Authority(normal_host(flow.request.host), flow.request.port)
        refusal = await self.refusal(target)
        if refusal is not None:
            log.info("refused %s http://%s from %s: %s", flow.request.method, target, _peer(flow), refusal)
            flow.response = plain_response(403, refusal + ".")

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        server = data.server
        if server.address is None or server.error:
            return
        host, port = normal_host(str(server.address[0])), int(server.address[1])
        if self.model_upstream((host, port)):
            return
        if self.provider_for(host) is not None:
            server.error = f"{host} is a model API host: the gateway reaches it on port 443 only"
            return
        ip, refusal = await self._resolve(Authority(host, port))
        if refusal is not None:
            log.info("refused connection to %s:%d: %s", host, port, refusal)
            server.error = refusal
        elif ip is not None:
            server.address = (str(ip), port)  # connect to exactly the address that was checked

    async def refusal(self, target: Authority) -> str | None:
        return (await self._resolve(target))[1]

    async def _resolve(self, target: Authority) -> tuple[IPAddress | None, str | None]:
        refusal = self.policy.port_refusal(target.host, target.port)
        if refusal is not None:
            return None, refusal
        try:
            ips = [ipaddress.ip_address(target.host)]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            except OSError as e:
                return None, f"{target.host} cannot be resolved ({e.strerror or type(e).__name__})"
            ips = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        for ip in ips:
            refusal = self.policy.address_refusal(target.host, ip, target.port, self.local_ips)
            if refusal is not None:
                return None, refusal  # any refused address refuses the name: no picking the good one
        return (ips[0] if ips else None), (None if ips else f"{target.host} has no address")


def local_addresses(listens: Iterable[tuple[str, int]]) -> frozenset[IPAddress]:
    """This machine's addresses, for "the gateway's own listen address" on a wildcard listen."""
    found: set[IPAddress] = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    names = {socket.gethostname(), *(h for h, _ in listens)}
    for name in names:
        try:
            for info in socket.getaddrinfo(name, None):
                found.add(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except (OSError, ValueError):
            continue
    return frozenset(found)
