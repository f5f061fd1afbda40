"""Decrypt only configured provider hosts; tunnel everything else untouched."""

from __future__ import annotations

import logging

from mitmproxy import connection, tls
from OpenSSL import SSL

from spendgate.runtime import Runtime

log = logging.getLogger("spendgate.tls")


class TlsPolicy:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        host = data.client_hello.sni or (data.context.server.address[0] if data.context.server.address else None)
        if host is None or self.rt.provider_for_host(host) is None:
            # Not a model API: pass the bytes through, the client sees the origin's own certificate.
            data.ignore_connection = True

    def tls_start_server(self, data: tls.TlsData) -> None:
        """Runs after mitmproxy's tlsconfig: relax verification only for upstreams configured so."""
        server = data.conn
        if not isinstance(server, connection.Server) or data.ssl_conn is None or server.address is None:
            return
        if not self.rt.verify_upstream(server.address[0], server.address[1]):
            data.ssl_conn.set_verify(SSL.VERIFY_NONE, None)
