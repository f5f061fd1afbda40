"""`spendgate serve` says what it is doing (contract, Start-up) and logs every refusal's reason;
`[log] format = "json"` gives one JSON object a line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from spendgate.store import Database
from tests.rig.gateway import GatewayProcess
from tests.rig.mock_provider import MockProvider


@pytest.fixture(scope="module")
def json_gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-serve-json"), _mock_provider_session.url, name="serve-json",
                       overrides={"log": {"format": "json"}})
    g.upstream_keys.pop("gemini")  # its key variable is not set: serve says so
    g.start()
    yield g
    g.stop()


def _records(gw: GatewayProcess) -> list[dict[str, object]]:
    out = []
    for line in gw.log_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
        else:
            assert line.startswith("=====") or not line.strip(), f"not a JSON log line: {line!r}"
    return out


def test_start_up_says_addresses_config_database_providers_ca_and_next_step(json_gw: GatewayProcess) -> None:
    msgs = [str(r["msg"]) for r in _records(json_gw) if r["logger"] == "spendgate"]
    text = "\n".join(msgs)
    assert f"127.0.0.1:{json_gw.port}" in text and f"http://127.0.0.1:{json_gw.metrics_port}/metrics" in text
    assert f"config: {json_gw.config_path.resolve()}" in text
    assert f"database: sqlite:///{Path(json_gw.db_path)}" in text and f"schema {Database.head_revision()}" in text
    assert "provider openai: key from env:OPENAI_API_KEY: present" in text
    assert "provider gemini: key from env:GEMINI_API_KEY: MISSING" in text
    assert f"CA certificate: {json_gw.ca_path}" in text
    assert any(m.startswith("next: `spendgate keys create") for m in msgs)
    for key in json_gw.upstream_keys.values():
        assert key not in json_gw.log_text()


def test_a_refusal_is_one_json_line_with_its_reason(json_gw: GatewayProcess) -> None:
    with json_gw.httpx_client(None) as h:
        r = h.get("https://api.openai.com/v1/models")
    assert r.status_code == 401
    rid = r.headers["x-spendgate-request-id"]
    json_gw.wait_for_log(rid)
    (rec,) = [r for r in _records(json_gw) if rid in str(r["msg"])]
    assert rec["level"] == "info" and rec["logger"] == "spendgate.stages.pipeline"
    assert "refused" in str(rec["msg"]) and "401 spendgate_no_key" in str(rec["msg"])


@pytest.mark.parametrize("taken", ["proxy", "metrics"])
def test_an_address_in_use_stops_serve_with_a_clear_error(tmp_path: Path, _mock_provider_session: MockProvider,
                                                          taken: str) -> None:
    import socket

    g = GatewayProcess(tmp_path, _mock_provider_session.url, name=f"serve-{taken}-taken")
    port = g.port if taken == "proxy" else g.metrics_port
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        cp = g.cli("serve", check=False)
    assert cp.returncode == 1, cp.stderr[-2000:]
    assert f"127.0.0.1:{port}" in cp.stderr and "in use" in cp.stderr.lower(), cp.stderr[-2000:]
    assert "Traceback" not in cp.stderr


def test_the_rig_takes_new_ports_when_one_it_chose_is_taken_before_serve_binds_it(
        tmp_path: Path, _mock_provider_session: MockProvider) -> None:
    """The kernel hands free_port()'s range to outgoing connections too (a suite run lost a start
    that way): a start-up that finds its port in use is tried once more on new ports."""
    import socket
    import urllib.request

    g = GatewayProcess(tmp_path, _mock_provider_session.url, name="serve-port-raced")
    first = g.metrics_port
    with socket.socket() as s:
        s.bind(("127.0.0.1", first))
        s.listen()
        g.start()
    try:
        assert g.metrics_port != first and "Address already in use" in g.log_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{g.metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200  # serving, on the ports the rig now says
    finally:
        g.stop()


@pytest.mark.parametrize("asserts", ["", "1"], ids=["optimized", "SPENDGATE_PYTHON_ASSERTS=1"])
def test_serve_runs_as_the_process_it_was_started_as_under_python_O(
        tmp_path: Path, _mock_provider_session: MockProvider, asserts: str) -> None:
    """`serve` re-executes itself with -O (mitmproxy's per-message type checks compiled out): same pid, same
    command line otherwise, still answering; SPENDGATE_PYTHON_ASSERTS=1 keeps a plain interpreter."""
    g = GatewayProcess(tmp_path, _mock_provider_session.url, name=f"serve-O{asserts}",
                       env={"SPENDGATE_PYTHON_ASSERTS": asserts})
    g.start()
    try:
        argv = Path(f"/proc/{g.proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert (argv[1:2] == [b"-O"]) is (asserts == ""), argv
        assert argv[-3:] == [b"serve", b"--config", str(g.config_path).encode()], argv
        with g.httpx_client(None) as h:
            assert h.get("https://api.openai.com/v1/models").status_code == 401  # the gateway itself answers
    finally:
        g.stop()
