"""spendgate.stages.onboarding_files: the CA certificate and the Node preload, served without credentials
to plain-HTTP requests addressed to the proxy itself, and nothing else to anyone else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import tflow, tutils

from spendgate.access import Authority
from spendgate.onboarding import CA_URL_PATH, NODE_PRELOAD, NODE_PRELOAD_URL_PATH
from spendgate.settings import parse_settings
from spendgate.stages.call import META
from spendgate.stages.onboarding_files import OnboardingFiles
from spendgate.stages.routing import connect_targets
from spendgate.testing import tcall

CERT = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
KEY_PEM = b"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n"
PORT = 8080


def stage(tmp_path: Path, cert: bytes = CERT, public_url: str = "http://gateway.corp.example:80") -> OnboardingFiles:
    (tmp_path / "mitmproxy-ca-cert.pem").write_bytes(cert)
    (tmp_path / "mitmproxy-ca.pem").write_bytes(KEY_PEM + cert)  # the key, next to it in the confdir
    settings = parse_settings({"proxy": {"listen": f"0.0.0.0:{PORT}", "confdir": str(tmp_path),
                                         "public_url": public_url}}, {})
    return OnboardingFiles.for_gateway(settings, connect_targets())


def request(host: str, port: int = PORT, path: str = CA_URL_PATH, method: str = "GET",
            sockname: tuple[str, int] = ("10.0.0.5", PORT)) -> Any:
    f = tflow.tflow(req=tutils.treq(method=method.encode(), host=host, port=port, path=path.encode(), content=b""))
    f.client_conn.timestamp_tls_setup = None  # plain HTTP to the proxy
    f.client_conn.sockname = sockname
    return f


def answer(s: OnboardingFiles, f: Any) -> Any:
    s.requestheaders(f)
    return f.response


@pytest.mark.parametrize(("host", "port"), [
    ("gateway.corp.example", 80),  # the public_url developers are given (a port forward in front)
    ("GATEWAY.corp.example.", PORT),
    ("10.0.0.5", PORT),  # the address this connection reached the gateway at
    ("127.0.0.1", PORT),
    ("::1", PORT),
    ("localhost", PORT),
])
def test_the_ca_certificate_is_served_to_requests_addressed_to_the_gateway(tmp_path: Path, host: str,
                                                                           port: int) -> None:
    r = answer(stage(tmp_path), request(host, port))
    assert r is not None and r.status_code == 200
    assert r.content == CERT and r.headers["content-type"] == "application/x-pem-file"


def test_the_node_preload_is_served_too(tmp_path: Path) -> None:
    r = answer(stage(tmp_path), request("127.0.0.1", path=NODE_PRELOAD_URL_PATH))
    assert r is not None and r.status_code == 200 and r.content == NODE_PRELOAD.read_bytes()


def test_head_answers_the_length_without_the_body(tmp_path: Path) -> None:
    r = answer(stage(tmp_path), request("127.0.0.1", method="HEAD"))
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == str(len(CERT))


@pytest.mark.parametrize(("host", "port", "why"), [
    ("example.com", PORT, "another host on the proxy's port"),
    ("10.0.0.6", PORT, "another address"),
    ("gateway.corp.example", 8081, "the gateway's name on another port"),
    ("127.0.0.1", 9464, "loopback, another port"),
])
def test_requests_for_other_hosts_are_not_looked_at(tmp_path: Path, host: str, port: int, why: str) -> None:
    assert answer(stage(tmp_path), request(host, port)) is None, why


def test_nothing_is_answered_inside_a_tunnel_or_over_tls(tmp_path: Path) -> None:
    s = stage(tmp_path)
    tunnelled = request("127.0.0.1")
    s.targets[tunnelled.client_conn] = Authority("127.0.0.1", PORT)
    assert answer(s, tunnelled) is None
    tls = request("127.0.0.1")
    tls.client_conn.timestamp_tls_setup = 1.0
    assert answer(s, tls) is None


def test_a_model_host_request_is_left_to_the_stages_that_govern_it(tmp_path: Path) -> None:
    f = request("127.0.0.1")
    f.metadata[META] = tcall()
    assert answer(stage(tmp_path), f) is None


@pytest.mark.parametrize(("path", "method", "status"), [
    ("/", "GET", 200),
    ("/spendgate/", "GET", 200),
    ("/spendgate/ca.key", "GET", 404),
    ("/etc/passwd", "GET", 404),
    ("/spendgate/../confdir/mitmproxy-ca.pem", "GET", 404),
    (CA_URL_PATH, "POST", 405),
    (CA_URL_PATH, "CONNECT", 405),
])
def test_other_requests_to_the_gateway_get_an_answer_and_never_a_file(tmp_path: Path, path: str, method: str,
                                                                      status: int) -> None:
    r = answer(stage(tmp_path), request("127.0.0.1", path=path, method=method))
    assert r is not None and r.status_code == status
    assert b"PRIVATE KEY" not in r.content and b"BEGIN CERTIFICATE" not in r.content
    if status != 405:
        assert CA_URL_PATH.encode() in r.content  # says where the CA is


def test_a_ca_file_holding_a_private_key_is_never_served(tmp_path: Path) -> None:
    leaked = KEY_PEM + CERT
    r = answer(stage(tmp_path, cert=leaked), request("127.0.0.1"))
    assert r is not None and r.status_code == 404 and b"secret" not in r.content


def test_a_ca_created_after_start_up_is_served_once_it_exists(tmp_path: Path) -> None:
    settings = parse_settings({"proxy": {"listen": f"127.0.0.1:{PORT}", "confdir": str(tmp_path)}}, {})
    s = OnboardingFiles.for_gateway(settings, connect_targets())
    assert answer(s, request("127.0.0.1")).status_code == 404
    (tmp_path / "mitmproxy-ca-cert.pem").write_bytes(CERT)
    assert answer(s, request("127.0.0.1")).content == CERT
