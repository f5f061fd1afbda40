"""A hostile client bound to one gateway, and the checks every hostile-client test repeats.

:class:`HostileClient` opens raw connections (see :mod:`tests.rig.rawclient`) and hands every
answer it reads to a recorder, so a suite can prove afterwards that no answer carried a
credential. The assertions say what a refusal must look like (provider-shaped, with a request
id, nothing upstream) and what a forwarded request must leave behind (one audit row).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

import httpx

from tests.rig.attacker import Listener
from tests.rig.gateway import GatewayProcess
from tests.rig.mock_provider import MockProvider
from tests.rig.rawclient import HTTP1, HeaderList, RawResponse, connect, http1_request, open_proxy, tls_tunnel

REQUEST_ID = "x-spendgate-request-id"


def host_of(target: str) -> str:
    """``api.openai.com:443`` -> ``api.openai.com``; ``[::1]:8443`` -> ``::1``."""
    host = target.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


class HostileClient:
    """Raw connections to ``gw``; ``record`` gets the bytes of every answer read on them.

    Answers read through :meth:`httpx` are for the caller to record (a stream is read by hand).
    """

    def __init__(self, gw: GatewayProcess, record: Callable[[bytes], None]) -> None:
        self.gw = gw
        self.record = record

    def connect(self, target: str, *, auth: str | None = None, timeout: float = 10.0) -> tuple[RawResponse, HTTP1]:
        """``CONNECT target``: the gateway's answer and the connection, left open."""
        return connect(self.gw.port, target, proxy_auth=auth, timeout=timeout, record=self.record)

    def tunnel(self, target: str = "api.openai.com:443", *, sni: str | None | EllipsisType = ...,
               auth: str | None = None, alpn: Sequence[str] = ("http/1.1",), check_hostname: bool = True,
               timeout: float = 10.0) -> HTTP1:
        """CONNECT, then TLS trusting the gateway CA; the SNI defaults to the CONNECT host."""
        server_hostname = host_of(target) if isinstance(sni, EllipsisType) else sni
        return tls_tunnel(self.gw.port, target, cafile=self.gw.ca_path, sni=server_hostname, proxy_auth=auth,
                          alpn=alpn, check_hostname=check_hostname, timeout=timeout, record=self.record)

    def direct(self, timeout: float = 10.0) -> HTTP1:
        """A plain connection to the proxy port, for absolute-form and origin-form requests."""
        return open_proxy(self.gw.port, timeout=timeout, record=self.record)

    def httpx(self, key: str | None = None, *, http2: bool = False,
              timeout: float | httpx.Timeout = 30.0) -> httpx.Client:
        """httpx through the gateway, speaking HTTP/1.1 or (``http2``) HTTP/2 inside the tunnel."""
        verify = _H2OnlyContext(ssl.PROTOCOL_TLS_CLIENT) if http2 else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        verify.load_verify_locations(cafile=str(self.gw.ca_path))
        return httpx.Client(proxy=self.gw.proxy_url(key, "mallory"), verify=verify, trust_env=False,
                            timeout=timeout, http2=http2)


class _H2OnlyContext(ssl.SSLContext):
    """Offers only ``h2`` in the tunnel's TLS handshake.

    httpcore offers ``["http/1.1", "h2"]`` inside a proxy tunnel and mitmproxy honours the
    client's order, so an httpx client built with ``http2=True`` would still speak HTTP/1.1.
    """

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        super().set_alpn_protocols(["h2"])


# --------------------------------------------------------------------------- assertions


def assert_provider_error(resp: RawResponse | httpx.Response, family: str, status: int,
                          code: str | None = None) -> None:
    """A JSON error in ``family``'s own shape with a request id; ``code`` is checked where the shape has one."""
    assert _status(resp) == status, f"wanted {status}, got {_status(resp)}: {_body(resp)[:400]!r}"
    assert request_id(resp).startswith("sgr_")
    ctype = resp.headers.get("content-type") if isinstance(resp, httpx.Response) else resp.header("content-type")
    assert ctype and ctype.startswith("application/json"), f"not JSON ({ctype}): {_body(resp)[:300]!r}"
    doc = resp.json()
    if family == "anthropic":
        assert doc["type"] == "error" and doc["error"]["type"] and doc["error"]["message"], doc
    elif family == "gemini":
        assert doc["error"]["code"] == status and doc["error"]["message"] and doc["error"]["status"], doc
    else:
        assert doc["error"]["message"] and doc["error"]["type"], doc
        if code is not None:
            assert doc["error"]["code"] == code, doc


def _status(resp: RawResponse | httpx.Response) -> int:
    return resp.status_code if isinstance(resp, httpx.Response) else resp.status


def _body(resp: RawResponse | httpx.Response) -> bytes:
    return resp.content if isinstance(resp, httpx.Response) else resp.body


def request_id(resp: RawResponse | httpx.Response) -> str:
    rid = resp.headers.get(REQUEST_ID) if isinstance(resp, httpx.Response) else resp.header(REQUEST_ID)
    assert rid, f"no {REQUEST_ID} on the answer ({_status(resp)})"
    return rid


def assert_nothing_reached(mock: MockProvider, *listeners: Listener) -> None:
    """No upstream saw anything: not the mock, not a connection to any listener."""
    assert mock.requests == [], f"reached the mock: {[(r.method, r.host, r.path) for r in mock.requests]}"
    for listener in listeners:
        assert listener.connections == 0, (
            f"{listener.address} got {listener.connections} connection(s): {listener.received[:300]!r}")


def audit_rows(gw: GatewayProcess, ids: Iterable[str] = (), *, user: str | None = None,
               timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """The audit rows by id (``audit --format json``), once every one of ``ids`` is there and finished."""
    want = set(ids)
    args = ["audit", "--limit", "10000"] + (["--user", user] if user else [])
    deadline = time.monotonic() + timeout
    while True:
        rows = gw.cli_json(*args)
        by_id: dict[str, dict[str, Any]] = {}
        for r in rows:
            assert r["id"] not in by_id, f"two audit rows with id {r['id']}"
            by_id[r["id"]] = dict(r)
        missing = sorted(i for i in want if i not in by_id or by_id[i]["ended_at"] is None)
        if not missing:
            return by_id
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished audit row for {missing} after {timeout}s")
        time.sleep(0.2)


def audit_row(gw: GatewayProcess, rid: str, timeout: float = 10.0) -> dict[str, Any]:
    return audit_rows(gw, [rid], timeout=timeout)[rid]


def assert_blocked_row(gw: GatewayProcess, resp: RawResponse | httpx.Response, status: int,
                       outcome: str = "blocked_policy") -> None:
    """The refusal left its audit row, saying so."""
    row = audit_row(gw, request_id(resp))
    assert (row["outcome"], row["status_code"]) == (outcome, status), row


# --------------------------------------------------------------------------- memory


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` in /proc), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssWatch:
    """Samples a process's RSS every 10 ms inside a ``with`` block: ``start``, ``peak``, ``growth_mib``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> RssWatch:
        self.start = self.peak = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.peak = max(self.peak, rss_kib(self.pid))

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 1024


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ModelCall:
    """One well-formed model request of a provider family, to be sent with hostile framing."""

    family: str
    host: str
    path: str
    doc: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def body(self) -> bytes:
        return json.dumps(self.doc).encode()

    def raw(self, *, host: str | None = None, target: str | None = None, method: str = "POST",
            headers: HeaderList = (), body: bytes | None = None) -> bytes:
        """HTTP/1.1 bytes: ``target`` is the request line's target (default: the path, origin-form)."""
        all_headers: list[tuple[str, str | bytes]] = [("Host", host or self.host),
                                                      ("Content-Type", "application/json"), *self.headers]
        all_headers += list(headers)
        return http1_request(method, target or self.path, all_headers, self.body if body is None else body)


CALLS: dict[str, ModelCall] = {
    "openai": ModelCall("openai", "api.openai.com", "/v1/chat/completions",
                        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
    "anthropic": ModelCall("anthropic", "api.anthropic.com", "/v1/messages",
                           {"model": "claude-3-5-haiku-20241022", "max_tokens": 16,
                            "messages": [{"role": "user", "content": "hi"}]},
                           (("anthropic-version", "2023-06-01"),)),
    "gemini": ModelCall("gemini", "generativelanguage.googleapis.com",
                        "/v1beta/models/gemini-2.0-flash:generateContent",
                        {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
    "azure": ModelCall("openai", "team.openai.azure.com",
                       "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01",
                       {"messages": [{"role": "user", "content": "hi"}]}),
}
