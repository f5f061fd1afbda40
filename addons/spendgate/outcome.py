"""How a request that ended in an error is classified for the audit log."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.connection import ConnectionState


def client_gone(flow: http.HTTPFlow) -> bool:
    msg = (flow.error.msg if flow.error else "").lower()
    return "client disconnected" in msg or flow.client_conn.state is ConnectionState.CLOSED


def classify_error(flow: http.HTTPFlow) -> tuple[str, int | None]:
    """(outcome, status) for a flow that ended in an error."""
    msg = (flow.error.msg if flow.error else "").lower()
    if client_gone(flow):
        return "client_aborted", flow.response.status_code if flow.response else None
    if flow.response is not None:
        return "upstream_error", flow.response.status_code
    if "timed out" in msg or "timeout" in msg:
        return "upstream_error", 504
    return "upstream_error", 502
