"""`spendgate onboard`: the address developers are given, the lines in each shell (run in the real
shell), the setup script's fixed parts, and the CLI's refusals. The script run on a workstation
against a real gateway is tests/e2e/test_onboarding.py."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from typer.testing import CliRunner

from spendgate.cli import app
from spendgate.cli.onboarding import ensure_ca
from spendgate.onboarding import (
    API_KEY_VARS,
    CA_VARS,
    KEY_PLACEHOLDER,
    PublicAddress,
    ca_fingerprint,
    environment,
    proxy_url,
    public_address,
)
from spendgate.onboarding.script import setup_script
from spendgate.onboarding.shells import Shell, env_lines, pasted_lines, pasted_refs
from spendgate.settings import ConfigError, parse_settings
from tests.unit.databases import sqlite_database

KEY = "sg_abcd1234_" + "K" * 43
GW = PublicAddress("gw.corp.example", 8080)
POSIX_SHELLS = [pytest.param(s, marks=pytest.mark.skipif(not shutil.which(s.value), reason=f"{s.value} not installed"))
                for s in (Shell.bash, Shell.zsh, Shell.fish)]


# --------------------------------------------------------------------------- the address


@pytest.mark.parametrize(("given", "stored"), [
    ("http://gateway.internal:8080", "http://gateway.internal:8080"),
    ("http://GW.Internal:3128/", "http://gw.internal:3128"),
    ("http://gw.internal", "http://gw.internal:80"),
    ("http://[fd00::1]:8080", "http://[fd00::1]:8080"),
])
def test_public_url_is_read_and_normalised(given: str, stored: str) -> None:
    assert parse_settings({"proxy": {"public_url": given}}, {}).proxy.public_url == stored


@pytest.mark.parametrize("bad", ["https://gw:8080", "gw.internal:8080", "http://gw:8080/proxy", "http://u:p@gw:8080",
                                 "http://gw:99999", "http://:8080", "", 8080])
def test_a_public_url_that_is_not_the_proxy_address_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="proxy.public_url"):
        parse_settings({"proxy": {"public_url": bad}}, {})


@pytest.mark.parametrize(("proxy", "url", "noted"), [
    ({"public_url": "http://gw.corp.example:80", "listen": "0.0.0.0:8080"}, "http://gw.corp.example:80", False),
    ({"listen": "0.0.0.0:8080"}, "http://buildhost:8080", True),
    ({"listen": "[::]:8080"}, "http://buildhost:8080", True),
    ({"listen": "10.1.2.3:3128"}, "http://10.1.2.3:3128", False),
    ({"listen": "127.0.0.1:8080"}, "http://127.0.0.1:8080", True),  # only this machine reaches it: say so
])
def test_the_public_address_is_public_url_else_derived_from_listen(proxy: dict[str, str], url: str,
                                                                   noted: bool) -> None:
    address = public_address(parse_settings({"proxy": proxy}, {}).proxy, "BuildHost")
    assert address.url == url
    assert (address.note is not None) == noted
    if noted and "0.0.0.0" in proxy["listen"]:
        assert "public_url" in (address.note or "") and "buildhost" in (address.note or "").lower()


# --------------------------------------------------------------------------- the proxy URL


class ProxyAuthCatcher:
    """A local TCP server that records the Proxy-Authorization of the one request a client sends it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.header: str | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            for line in data.decode("latin-1").split("\r\n"):
                if line.lower().startswith("proxy-authorization:"):
                    self.header = line.split(":", 1)[1].strip()
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.sock.close()


@pytest.mark.parametrize("user", ["ana@corp", "o'brien", "a b:c/d", "x$(id)`id`\"", "名前"])
def test_user_names_are_url_encoded_so_curl_sends_them_back_intact(user: str) -> None:
    url = proxy_url(PublicAddress("127.0.0.1", 1), user, KEY)
    parts = urlsplit(url)
    assert (parts.hostname, parts.port, unquote(parts.username or ""), parts.password) == ("127.0.0.1", 1, user, KEY)
    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    catcher = ProxyAuthCatcher()
    url = proxy_url(PublicAddress("127.0.0.1", catcher.port), user, KEY)
    cp = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-x", url, "http://example.invalid/"],
                        capture_output=True, text=True, timeout=20)
    catcher.thread.join(10)
    assert catcher.header is not None, cp.stderr  # curl accepted the URL and sent credentials
    assert base64.b64decode(catcher.header.removeprefix("Basic ")).decode() == f"{user}:{KEY}"


# --------------------------------------------------------------------------- the lines, run in the real shell


def shell_env(shell: Shell, script: str, env: dict[str, str], cwd: Path) -> dict[str, str]:
    """The environment after `script` ran in `shell`."""
    argv = {Shell.fish: ["fish", "--no-config", "-c"], Shell.zsh: ["zsh", "-f", "-c"]}.get(shell,
                                                                                        ["bash", "--norc", "-c"])
    cp = subprocess.run([*argv, script + "\nenv -0"], env=env, cwd=cwd, capture_output=True, timeout=30)
    assert cp.returncode == 0, cp.stderr.decode()
    return dict(item.split("=", 1) for item in cp.stdout.decode().split("\0") if "=" in item)


def base_env(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), **extra}


@pytest.mark.parametrize("shell", POSIX_SHELLS)
def test_pasted_lines_set_every_variable_in_the_shell(shell: Shell, tmp_path: Path) -> None:
    home = tmp_path / "my home"  # a space: every path must stay one word
    home.mkdir()
    lines = env_lines(GW, "ana@corp", shell, pasted_refs(shell, KEY))
    got = shell_env(shell, "\n".join(lines), base_env(home), tmp_path)
    proxy = "http://ana%40corp:" + KEY + "@gw.corp.example:8080"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        assert got[name] == proxy, name
    assert got["NO_PROXY"] == got["no_proxy"] == "localhost,127.0.0.1,::1"
    for name in CA_VARS:
        assert got[name] == f"{home}/.spendgate/ca-bundle.pem", name
    for name in API_KEY_VARS:
        assert got[name] == "spendgate" and not got[name].startswith("sk-")
    assert got["NODE_USE_ENV_PROXY"] == "1"
    assert "NODE_OPTIONS" not in got  # no preload on this machine yet: a --require of a missing file breaks node


@pytest.mark.parametrize("shell", POSIX_SHELLS)
def test_node_options_gets_the_preload_once_in_front_of_the_developers_own(shell: Shell, tmp_path: Path) -> None:
    home = tmp_path / "my home"
    (home / ".spendgate").mkdir(parents=True)
    preload = home / ".spendgate" / "node-proxy.cjs"
    preload.write_text("console.error('spendgate preload loaded');\n")
    lines = "\n".join(env_lines(GW, "ana@corp", shell, pasted_refs(shell, KEY)))
    got = shell_env(shell, lines + "\n" + lines, base_env(home, NODE_OPTIONS="--max-old-space-size=100"), tmp_path)
    assert got["NODE_OPTIONS"] == f'--require "{preload}" --max-old-space-size=100'
    if shutil.which("node"):  # node reads the quoted path as one: the preload runs
        cp = subprocess.run(["node", "-e", "0"], env=base_env(home, NODE_OPTIONS=got["NODE_OPTIONS"]),
                            capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0 and "spendgate preload loaded" in cp.stderr, cp.stderr


def test_lines_without_a_key_say_where_it_goes() -> None:
    lines = pasted_lines(GW, "ana@corp", None, Shell.bash, "AB" * 32)
    assert any(KEY_PLACEHOLDER in line and line.startswith("export HTTPS_PROXY=") for line in lines)
    assert lines[0].startswith("# ") and "AB" * 32 in lines[0] and GW.url in lines[0]
    assert not any(re.search(r"sg_[a-z0-9]{8}_", line) for line in lines)


def test_pasted_lines_fetch_the_ca_from_the_gateway_itself() -> None:
    lines = pasted_lines(GW, "ana@corp", KEY, Shell.bash, "AB" * 32)
    fetch = next(line for line in lines if line.startswith("mkdir"))
    assert f"--noproxy '*' -o \"$HOME/.spendgate/gateway-ca.pem\" {GW.url}/spendgate/ca.pem" in fetch
    assert "/etc/ssl/certs/ca-certificates.crt" in fetch and '> "$HOME/.spendgate/ca-bundle.pem"' in fetch


@pytest.mark.parametrize("shell", [Shell.bash, Shell.fish, Shell.powershell])
def test_every_shell_gets_every_variable(shell: Shell) -> None:
    text = "\n".join(pasted_lines(GW, "ana@corp", KEY, shell, "AB" * 32))
    prefix = {Shell.powershell: "$env:", Shell.fish: "set -gx ", Shell.bash: "export "}[shell]
    for v in environment(GW, "ana@corp"):
        assert f"{prefix}{v.name}" in text, v.name
    assert "NODE_OPTIONS" in text and "node-proxy.cjs" in text


# --------------------------------------------------------------------------- the setup script


@pytest.fixture
def ca_pem(tmp_path: Path) -> str:
    settings = parse_settings({"proxy": {"confdir": str(tmp_path / "confdir")}}, {})
    return ensure_ca(settings).read_text()


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_the_script_carries_the_fingerprint_openssl_computes(ca_pem: str, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text(ca_pem)
    out = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "ca.pem"), "-noout", "-fingerprint", "-sha256"],
                         capture_output=True, text=True, check=True).stdout
    expected = out.split("=", 1)[1].strip().replace(":", "")
    assert ca_fingerprint(ca_pem) == expected
    assert f"SG_CA_SHA256='{expected}'" in setup_script(GW, "ana@corp", None, Shell.bash, ca_pem)


@pytest.mark.parametrize("shell", [Shell.bash, Shell.zsh, Shell.fish])
def test_the_posix_script_parses_and_writes_that_shells_lines(shell: Shell, ca_pem: str, tmp_path: Path) -> None:
    text = setup_script(GW, "ana@corp", KEY, shell, ca_pem)
    assert text.startswith("#!/bin/sh\n")
    assert f"SG_SHELL='{shell.value}'" in text and f"SG_KEY='{KEY}'" in text and f"SG_GATEWAY='{GW.url}'" in text
    path = tmp_path / "setup.sh"
    path.write_text(text)
    for sh in ("sh", "bash"):
        cp = subprocess.run([sh, "-n", str(path)], capture_output=True, text=True)
        assert cp.returncode == 0, cp.stderr
    body = text.split("cat <<'SPENDGATE_ENV'\n", 1)[1].split("\nSPENDGATE_ENV\n", 1)[0]
    first = {Shell.fish: "set -gx HTTPS_PROXY "}.get(shell, "export HTTPS_PROXY=")
    assert body.splitlines()[0].startswith(first)
    if shell is Shell.fish and shutil.which("fish"):
        (tmp_path / "env.fish").write_text(body + "\n")
        cp = subprocess.run(["fish", "--no-execute", str(tmp_path / "env.fish")], capture_output=True, text=True)
        assert cp.returncode == 0, cp.stderr


def test_a_script_without_a_key_asks_for_it(ca_pem: str) -> None:
    assert "\nSG_KEY=''\n" in setup_script(GW, "ana@corp", None, Shell.bash, ca_pem)


def test_the_powershell_script_holds_the_settings_and_the_lines(ca_pem: str) -> None:
    """Not run here (no PowerShell on this machine): its text is checked, the script is not."""
    text = setup_script(GW, "ana@corp", None, Shell.powershell, ca_pem)
    assert f"$SgGateway = '{GW.url}'" in text and f"$SgCaSha256 = '{ca_fingerprint(ca_pem)}'" in text
    assert "$SgKey = ''" in text and "$SgUser = 'ana@corp'" in text
    body = text.split("@'\n", 1)[1].split("\n'@", 1)[0]
    assert '$env:HTTPS_PROXY = "http://ana%40corp:${SPENDGATE_KEY}@gw.corp.example:8080"' in body
    assert '$env:SSL_CERT_FILE = "$env:SPENDGATE_HOME/ca-bundle.pem"' in body
    for v in environment(GW, "ana@corp"):
        assert f"'{v.name}'" in text.split("$SgVarNames = @(", 1)[1].split(")", 1)[0]
    assert "Cert:\\LocalMachine\\Root" in text and "$PROFILE" in text


# --------------------------------------------------------------------------- the commands


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    sqlite_database(tmp_path / "spendgate.db").close()
    config = tmp_path / "spendgate.toml"
    config.write_text(f'[proxy]\nlisten = "0.0.0.0:8080"\npublic_url = "http://gw.corp.example:8080"\n'
                      f'confdir = "{tmp_path / "confdir"}"\n[database]\nurl = "sqlite:///spendgate.db"\n')
    monkeypatch.delenv("SPENDGATE_CONFIG", raising=False)
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> Any:
        result = runner.invoke(app, [*args, "--config", str(config)])
        assert result.exit_code == code, (result.stdout, result.stderr)
        return result

    return run


def test_onboard_of_an_unknown_user_is_refused(cli: Any) -> None:
    result = cli("onboard", "nobody", code=1)
    assert result.stdout == "" and "nobody" in result.stderr and "keys create" in result.stderr


def test_onboard_prints_lines_for_the_public_url(cli: Any) -> None:
    cli("keys", "create", "ana@corp", "--format", "json")
    out = cli("onboard", "ana@corp").stdout
    assert f'export HTTPS_PROXY="http://ana%40corp:{KEY_PLACEHOLDER}@gw.corp.example:8080"' in out
    assert "http://gw.corp.example:8080/spendgate/ca.pem" in out


def test_onboard_of_a_user_whose_keys_are_revoked_is_refused(cli: Any) -> None:
    cli("keys", "create", "ana@corp", "--format", "json")
    cli("keys", "revoke", "ana@corp")
    assert "no active key" in cli("onboard", "ana@corp", code=1).stderr


def test_onboard_key_must_be_that_users(cli: Any) -> None:
    ana = json.loads(cli("keys", "create", "ana@corp", "--format", "json").stdout)
    bob = json.loads(cli("keys", "create", "bob", "--format", "json").stdout)
    assert ana["key"] in cli("onboard", "ana@corp", "--key", ana["key"]).stdout
    assert "not an active key of ana@corp" in cli("onboard", "ana@corp", "--key", bob["key"], code=2).stderr


def test_keys_create_and_rotate_print_the_lines_with_the_key(cli: Any) -> None:
    made = json.loads(cli("keys", "create", "ana@corp", "--format", "json").stdout)
    assert any(made["key"] in line and "@gw.corp.example:8080" in line for line in made["onboard"])
    rotated = json.loads(cli("keys", "rotate", made["key_id"], "--format", "json").stdout)
    assert rotated["user"] == "ana@corp" and rotated["key"] != made["key"]
    text = "\n".join(rotated["onboard"])
    assert f"http://ana%40corp:{rotated['key']}@gw.corp.example:8080" in text and made["key"] not in text
    table = cli("keys", "rotate", made["key_id"]).stdout
    new_key = table.split("Shown only now:\n", 1)[1].split("\n", 1)[0]
    assert f'export HTTPS_PROXY="http://ana%40corp:{new_key}@gw.corp.example:8080"' in table


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish", "powershell"])
def test_onboard_script_for_each_shell(cli: Any, shell: str) -> None:
    cli("keys", "create", "ana@corp", "--format", "json")
    out = cli("onboard", "ana@corp", "--script", "--shell", shell).stdout
    if shell == "powershell":
        assert "$SgGateway = 'http://gw.corp.example:8080'" in out
    else:
        assert out.startswith("#!/bin/sh") and f"SG_SHELL='{shell}'" in out


def test_onboard_with_a_wildcard_listen_and_no_public_url_says_so(cli: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "spendgate.toml"
    config.write_text(config.read_text().replace('public_url = "http://gw.corp.example:8080"\n', ""))
    monkeypatch.setattr("spendgate.cli.onboarding.socket.gethostname", lambda: "buildhost")
    cli("keys", "create", "ana@corp", "--format", "json")
    result = cli("onboard", "ana@corp")
    assert "@buildhost:8080" in result.stdout and "public_url" in result.stderr
