"""Stage: the files a developer fetches from the gateway itself, without credentials.

A plain-HTTP GET addressed to the proxy (`curl http://GATEWAY:8080/spendgate/ca.pem`: not a
CONNECT, not inside a tunnel, for the proxy's own name or address and port) is answered here with
the CA *certificate* (never its key) or the Node preload. Nothing is forwarded: every request
addressed to the proxy itself is answered here (404 for other paths), so none of them reaches
`Identity` or `Destinations`, and requests to any other host are not looked at.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import connection, http

from spendgate.access import Authority, normal_host
from spendgate.onboarding import CA_URL_PATH, NODE_PRELOAD, NODE_PRELOAD_URL_PATH, ca_cert_path, public_address
from spendgate.settings import Settings
from spendgate.stages.call import get_call, plain_response

log = logging.getLogger(__name__)

INDEX_PATHS = frozenset({"/", "/spendgate", "/spendgate/"})


@dataclass(frozen=True)
class ServedFile:
    path: Path
    content_type: str
    public_pem: bool = False  # must hold a certificate and no private key


class OnboardingFiles:
    def __init__(self, files: dict[str, ServedFile], names: Iterable[str], ports: Iterable[int],
                 targets: weakref.WeakKeyDictionary[connection.Client, Authority]) -> None:
        self.files = files
        self.names = frozenset(normal_host(n) for n in names if n)
        self.ports = frozenset(ports)
        self.targets = targets  # clients that sent a CONNECT: their requests are for the tunnel's host
        self._cache: dict[str, bytes] = {}
        for url_path in files:
            self._load(url_path)  # at start-up, so the hook reads no file (the CA exists once mitmproxy ran)

    @classmethod
    def for_gateway(cls, settings: Settings,
                    targets: weakref.WeakKeyDictionary[connection.Client, Authority]) -> OnboardingFiles:
        """Named as the onboarding lines name it (`[proxy] public_url`), or by this machine's name or address."""
        proxy = settings.proxy
        hostname = socket.gethostname()
        public = public_address(proxy, hostname)
        names = {proxy.listen.host, "localhost", hostname, public.host}
        ports = {proxy.listen.port, public.port}
        files = {
            CA_URL_PATH: ServedFile(ca_cert_path(proxy.confdir), "application/x-pem-file", public_pem=True),
            NODE_PRELOAD_URL_PATH: ServedFile(NODE_PRELOAD, "application/javascript; charset=utf-8"),
        }
        return cls(files, names, ports, targets)

    def _load(self, url_path: str) -> bytes | None:
        if url_path not in self._cache:
            served = self.files[url_path]
            try:
                data = served.path.read_bytes()
            except OSError:
                return None
            if served.public_pem and (b"PRIVATE KEY" in data or b"BEGIN CERTIFICATE" not in data):
                log.error("refusing to serve %s: it is not a certificate alone", served.path)
                return None
            self._cache[url_path] = data
        return self._cache[url_path]

    def addressed_to_me(self, flow: http.HTTPFlow) -> bool:
        conn = flow.client_conn
        if conn.tls_established or conn in self.targets:
            return False
        host, port = normal_host(flow.request.host), flow.request.port
        if port not in self.ports and (conn.sockname is None or port != conn.sockname[1]):
            return False
        if host in self.names:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        # The address the client reached this gateway at (covers a wildcard listen and every interface).
        return ip.is_loopback or (conn.sockname is not None and ip == _ip(conn.sockname[0]))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or get_call(flow) is not None or not self.addressed_to_me(flow):
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else "?"
        if req.method not in ("GET", "HEAD"):
            flow.response = plain_response(405, "the gateway serves files here with GET only.", {"allow": "GET, HEAD"})
            return
        data = self._load(path) if path in self.files else None
        if data is None:
            status = 200 if path in INDEX_PATHS else 404
            flow.response = plain_response(status, self._index())
            return
        log.info("served %s to %s", path, peer)
        headers = {"content-type": self.files[path].content_type, "cache-control": "no-cache"}
        flow.response = http.Response.make(200, b"" if req.method == "HEAD" else data, headers)
        flow.response.headers["content-length"] = str(len(data))

    def _index(self) -> str:
        return ("this is a Spendgate gateway (an HTTP proxy: set HTTPS_PROXY=http://USER:KEY@host:port). "
                f"Without credentials it serves: {CA_URL_PATH} (its CA certificate) and {NODE_PRELOAD_URL_PATH} "
                "(the preload Node 20/22 needs for fetch() to use HTTPS_PROXY).")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
