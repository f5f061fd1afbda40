"""spendgate.cli.doctor: each check names what it looked at (the variable the config reads, the
database file, the addresses) and what to do; no check changes anything (no empty database file)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spendgate.cli.doctor import Check, run_checks
from spendgate.settings import Settings, load_settings
from spendgate.store import Database
from tests.rig.gateway import free_port


def settings(tmp_path: Path, text: str, env: dict[str, str] | None = None, **ports: int) -> Settings:
    cfg = tmp_path / "etc" / "spendgate.toml"
    cfg.parent.mkdir(exist_ok=True)
    proxy, metrics = ports.get("proxy", free_port()), ports.get("metrics", free_port())
    cfg.write_text(f'[proxy]\nlisten = "127.0.0.1:{proxy}"\nconfdir = "{tmp_path / "ca"}"\n'
                   f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n' + text)
    return load_settings(cfg, environ=env or {})


def check(checks: list[Check], name: str) -> Check:
    (found,) = [c for c in checks if c.name == name]
    return found


def test_the_key_variable_is_the_one_the_config_reads(tmp_path: Path) -> None:
    text = '[providers.openai]\napi_key = "env:CORP_OPENAI_KEY"\n[providers.azure]\n'
    unset = check(run_checks(settings(tmp_path, text)), "upstream key openai")
    assert unset.status == "WARN" and "CORP_OPENAI_KEY" in unset.detail and "OPENAI_API_KEY" not in unset.detail
    assert "providers.openai.api_key" in unset.detail
    azure = check(run_checks(settings(tmp_path, text)), "upstream key azure")  # no api_key: the provider's usual
    assert azure.status == "WARN" and "AZURE_OPENAI_API_KEY" in azure.detail
    ok = check(run_checks(settings(tmp_path, text, {"CORP_OPENAI_KEY": "sk-x"})), "upstream key openai")
    assert ok.status == "OK" and ok.detail == "set from $CORP_OPENAI_KEY" and "sk-x" not in ok.detail


def test_the_database_file_is_named_and_never_created(tmp_path: Path) -> None:
    s = settings(tmp_path, '[database]\nurl = "sqlite:///data/sg.db"\n')
    db_file = tmp_path / "etc" / "data" / "sg.db"  # beside the config, not in the working directory
    missing = check(run_checks(s), "database")
    assert missing.status == "FAIL" and str(db_file) in missing.detail and "spendgate db upgrade" in missing.detail
    assert not db_file.exists() and not db_file.parent.exists()
    Database(s.database.url).upgrade()
    ok = check(run_checks(s), "database")
    assert ok.status == "OK" and str(db_file) in ok.detail


def test_no_gateway_running_is_said_with_the_addresses(tmp_path: Path) -> None:
    proxy, metrics = free_port(), free_port()
    checks = run_checks(settings(tmp_path, "", proxy=proxy, metrics=metrics))
    p, m = check(checks, "gateway proxy"), check(checks, "gateway metrics")
    assert p.status == m.status == "WARN"
    assert f"127.0.0.1:{proxy}" in p.detail and f"127.0.0.1:{metrics}/metrics" in m.detail
    assert "spendgate serve" in p.detail


class _NotSpendgate(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self._answer()

    def do_CONNECT(self) -> None:  # noqa: N802
        self._answer()

    def _answer(self) -> None:
        body = b"# HELP other_metric something else\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _NotSpendgate)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_another_program_on_the_ports_is_not_taken_for_the_gateway(tmp_path: Path, other_server: int) -> None:
    checks = run_checks(settings(tmp_path, "", proxy=other_server, metrics=other_server))
    p, m = check(checks, "gateway proxy"), check(checks, "gateway metrics")
    assert p.status == m.status == "WARN"
    assert "other than Spendgate" in p.detail and "proxy.listen" in p.detail
    assert "another program" in m.detail and "metrics.listen" in m.detail


def test_the_tokenizer_check_names_the_encodings_and_where_they_go(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    code = ("from spendgate.cli.doctor import _tokenizer; c = _tokenizer(); print(c.status); print(c.detail)")
    shared = os.environ.get("TIKTOKEN_CACHE_DIR")
    if shared and os.path.isdir(shared):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "TIKTOKEN_CACHE_DIR": shared}).stdout.splitlines()
        assert out[0] == "OK" and "o200k_base, cl100k_base" in out[1] and shared in out[1]
    empty = tmp_path / "cache"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TIKTOKEN_CACHE_DIR": str(empty)}).stdout.splitlines()
    assert out[0] == "WARN" and "bytes/4" in out[1]
    # The exact files an offline machine needs: tiktoken's cache names each by the SHA-1 of its URL.
    assert str(empty / "fb374d419588a4632f3f557e76b4b70aebbca790") in out[1]  # o200k_base
    assert "o200k_base.tiktoken" in out[1] and "cl100k_base.tiktoken" in out[1]
