"""Decrypt model hosts, tunnel everything else untouched.

Interception is decided by the CONNECT target, never by what the client hello claims: a model
host is always decrypted (so it is always governed), and a connection whose SNI names a model
host is decrypted too, so that routing can refuse the mismatch instead of letting it pass
unseen. Everything else is passed through as bytes; the client sees the origin's own certificate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import connection, tls
from OpenSSL import SSL

from spendgate.access import normal_host

log = logging.getLogger("spendgate.tls")


class TlsPolicy:
    def __init__(self, is_model_host: Callable[[str], bool], verify_upstream: Callable[[str, int], bool]) -> None:
        self.is_model_host = is_model_host
        self.verify_upstream = verify_upstream

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        target = data.context.server.address
        sni = data.client_hello.sni
        model = (target is not None and self.is_model_host(normal_host(str(target[0])))) or (
            sni is not None and self.is_model_host(normal_host(sni)))
        if not model:
            data.ignore_connection = True

    def tls_start_server(self, data: tls.TlsData) -> None:
        """Runs after mitmproxy's tlsconfig: relax verification only for upstreams configured so."""
        server = data.conn
        if not isinstance(server, connection.Server) or data.ssl_conn is None or server.address is None:
            return
        if not self.verify_upstream(server.address[0], server.address[1]):
            data.ssl_conn.set_verify(SSL.VERIFY_NONE, None)
