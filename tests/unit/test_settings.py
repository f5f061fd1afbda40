"""spendgate.settings: defaults, `env:` references, and a ConfigError naming the key for each bad value."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spendgate.providers import BUILTIN_PROVIDERS
from spendgate.settings import (
    ConfigError,
    HostPort,
    Settings,
    load_settings,
    parse_settings,
    resolve_config_path,
)

REPO = Path(__file__).resolve().parents[2]
SPENDGATE = Path(sys.executable).parent / "spendgate"
UPSTREAM = "upstream-openai-settings-test-key"


def parse(raw: dict[str, Any], env: dict[str, str] | None = None) -> Settings:
    return parse_settings(raw, env or {})


# -- defaults -----------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    s = parse({})
    assert s.proxy.listen == HostPort("127.0.0.1", 8080)
    assert s.proxy.confdir == Path("~/.spendgate").expanduser()
    assert s.proxy.max_request_bytes == 33554432
    assert s.proxy.block_other_hosts is False
    assert s.database.url == "sqlite:///spendgate.db"
    assert s.metrics.listen == HostPort("127.0.0.1", 9464)
    assert s.audit.capture_content is False and s.audit.content_retention_days == 30
    assert s.budgets.fail_closed is True
    assert s.budgets.default_max_output_tokens == 4096 and s.budgets.reservation_ttl_seconds == 600
    assert s.alerts.slack.webhook_url is None and s.alerts.slack.thresholds == (50, 80, 100)
    assert dict(s.prices.overrides) == {}
    # every built-in provider exists, on its own hosts, no upstream override, TLS verified
    assert [p.name for p in s.providers] == list(BUILTIN_PROVIDERS)
    for p in s.providers:
        assert p.hosts == BUILTIN_PROVIDERS[p.name].hosts
        assert p.upstream is None and p.verify_upstream_tls is True
        assert p.api_key is None  # its default env var is unset here
        assert p.api_key_source == f"env:{BUILTIN_PROVIDERS[p.name].default_key_env}"


def test_provider_keys_default_to_their_usual_env_vars() -> None:
    env = {spec.default_key_env: f"value-for-{name}" for name, spec in BUILTIN_PROVIDERS.items()}
    s = parse({}, env)
    for p in s.providers:
        assert p.api_key == f"value-for-{p.name}"
    assert s.provider("azure") is not None and s.provider("azure").api_key == "value-for-azure"  # type: ignore[union-attr]
    assert env["AZURE_OPENAI_API_KEY"] == "value-for-azure"
    assert s.provider("nope") is None


def test_example_config_is_the_defaults() -> None:
    example = REPO / "config" / "spendgate.example.toml"
    s = load_settings(example, environ={"OPENAI_API_KEY": UPSTREAM})
    # The defaults as read for the same file: a relative SQLite path is relative to the config file.
    d = parse_settings({}, {}, example)
    assert (s.proxy, s.database, s.metrics, s.audit, s.budgets, s.alerts.slack.thresholds) == (
        d.proxy, d.database, d.metrics, d.audit, d.budgets, d.alerts.slack.thresholds)
    assert s.provider("openai").api_key == UPSTREAM  # type: ignore[union-attr]


def test_a_full_config_is_read() -> None:
    s = parse(
        {
            "proxy": {"listen": "0.0.0.0:3128", "confdir": "/tmp/sg-ca", "max_request_bytes": 1024,
                      "block_other_hosts": True},
            "database": {"url": "postgresql://gw@db.internal/spend"},
            "metrics": {"listen": "[::1]:9000"},
            "audit": {"capture_content": True, "content_retention_days": 7},
            "budgets": {"fail_closed": False},
            "providers": {
                "openai": {"api_key": "inline-key", "upstream": "https://127.0.0.1:9443", "verify_upstream_tls": False},
                "azure": {"hosts": ["my.openai.azure.com", "*.example.net"]},
            },
            "alerts": {"slack": {"webhook_url": "env:HOOK", "thresholds": [100, 50]}},
            "prices": {"overrides": {"openai:gpt-4o": {"input": 2.5, "output": 10.0, "cache_read": 1.25}}},
        },
        {"HOOK": "https://hooks.example/x"},
    )
    assert s.proxy.listen == HostPort("0.0.0.0", 3128) and s.proxy.confdir == Path("/tmp/sg-ca")
    assert s.proxy.max_request_bytes == 1024 and s.proxy.block_other_hosts is True
    assert s.database.url == "postgresql+psycopg://gw@db.internal/spend"  # psycopg 3, not psycopg2
    assert s.metrics.listen == HostPort("::1", 9000)
    assert str(s.metrics.listen) == "[::1]:9000"  # printed so that it parses back
    assert (s.audit.capture_content, s.audit.content_retention_days, s.budgets.fail_closed) == (True, 7, False)
    openai = s.provider("openai")
    assert openai is not None and openai.api_key == "inline-key" and openai.api_key_source == "inline"
    assert openai.upstream is not None and (openai.upstream.scheme, openai.upstream.host, openai.upstream.port) == (
        "https", "127.0.0.1", 9443)
    assert openai.verify_upstream_tls is False
    assert s.provider("azure").hosts == ("my.openai.azure.com", "*.example.net")  # type: ignore[union-attr]
    assert s.alerts.slack.webhook_url == "https://hooks.example/x" and s.alerts.slack.thresholds == (50, 100)
    ov = s.prices.overrides["openai:gpt-4o"]
    assert str(ov.input) == "2.5" and str(ov.output) == "10.0" and str(ov.cache_read) == "1.25"


@pytest.mark.parametrize(
    ("url", "port"), [("https://mock.local", 443), ("http://mock.local", 80), ("https://mock.local:8443/", 8443)]
)
def test_upstream_default_ports(url: str, port: int) -> None:
    up = parse({"providers": {"openai": {"upstream": url}}}).provider("openai").upstream  # type: ignore[union-attr]
    assert up is not None and up.port == port and up.host == "mock.local"


# -- env: references ----------------------------------------------------------


def test_env_references_are_resolved() -> None:
    s = parse(
        {"database": {"url": "env:SG_DB"}, "proxy": {"confdir": "env:SG_CA"},
         "providers": {"anthropic": {"api_key": "env:MY_ANTHROPIC"}}},
        {"SG_DB": "sqlite:////var/lib/sg.db", "SG_CA": "/etc/sg", "MY_ANTHROPIC": "from-env"},
    )
    assert s.database.url == "sqlite:////var/lib/sg.db"
    assert s.proxy.confdir == Path("/etc/sg")
    a = s.provider("anthropic")
    assert a is not None and a.api_key == "from-env" and a.api_key_source == "env:MY_ANTHROPIC"


def test_unset_env_for_a_provider_key_means_not_configured() -> None:
    p = parse({"providers": {"openai": {"api_key": "env:NOT_SET_ANYWHERE"}}}).provider("openai")
    assert p is not None and p.api_key is None and p.api_key_source == "env:NOT_SET_ANYWHERE"
    assert parse({"providers": {"openai": {"api_key": "env:EMPTY"}}}, {"EMPTY": ""}).provider("openai").api_key is None  # type: ignore[union-attr]


def test_load_settings_reads_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "sg.toml"
    cfg.write_text('[database]\nurl = "env:SG_TEST_DB_URL"\n')
    monkeypatch.setenv("SG_TEST_DB_URL", f"sqlite:///{tmp_path}/x.db")
    assert load_settings(cfg).database.url == f"sqlite:///{tmp_path}/x.db"
    assert load_settings(cfg).config_path == cfg


def test_a_relative_sqlite_path_in_a_config_file_is_relative_to_the_file(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "etc" / "sg.toml"
    cfg.parent.mkdir()
    cfg.write_text('[database]\nurl = "sqlite:///data/sg.db"\n')
    monkeypatch.chdir(tmp_path)  # not where the file is: a CLI command may run anywhere
    assert load_settings(cfg).database.url == f"sqlite:///{tmp_path / 'etc' / 'data' / 'sg.db'}"
    assert parse({"database": {"url": "sqlite:///data/sg.db"}}).database.url == "sqlite:///data/sg.db"  # no file


def test_secrets_are_not_in_repr() -> None:
    s = parse({"providers": {"openai": {"api_key": UPSTREAM}}, "alerts": {"slack": {"webhook_url": "https://hooks.example/SECRET"}}})
    assert s.provider("openai").api_key == UPSTREAM  # type: ignore[union-attr]
    text = repr(s) + str(s)
    assert UPSTREAM not in text
    assert "hooks.example/SECRET" not in text


# -- config path resolution ---------------------------------------------------


def test_resolve_config_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPENDGATE_CONFIG", raising=False)
    assert resolve_config_path(None) is None  # built-in defaults
    (tmp_path / "spendgate.toml").write_text("")
    assert resolve_config_path(None) == Path("spendgate.toml")
    monkeypatch.setenv("SPENDGATE_CONFIG", str(tmp_path / "from-env.toml"))
    assert resolve_config_path(None) == tmp_path / "from-env.toml"
    assert resolve_config_path(tmp_path / "explicit.toml") == tmp_path / "explicit.toml"


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy\nlisten = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


# -- each bad value names its key ---------------------------------------------

OPENAI_UP = "providers.openai.upstream"
PRICE = "prices.overrides"


def price(value: object) -> dict[str, Any]:
    return {"prices": {"overrides": {"openai:gpt-4o": value}}}


BAD: list[tuple[str, dict[str, Any], dict[str, str], str]] = [
    # (id, raw config, env, the key the message must name)
    ("listen-nope", {"proxy": {"listen": "nope"}}, {}, "proxy.listen"),
    ("listen-int", {"proxy": {"listen": 8080}}, {}, "proxy.listen"),
    ("listen-port-text", {"proxy": {"listen": "127.0.0.1:http"}}, {}, "proxy.listen"),
    ("listen-port-range", {"proxy": {"listen": "127.0.0.1:70000"}}, {}, "proxy.listen"),
    ("listen-no-host", {"proxy": {"listen": ":8080"}}, {}, "proxy.listen"),
    ("metrics-listen", {"metrics": {"listen": "9464"}}, {}, "metrics.listen"),
    ("max-bytes-text", {"proxy": {"max_request_bytes": "32MB"}}, {}, "proxy.max_request_bytes"),
    ("max-bytes-zero", {"proxy": {"max_request_bytes": 0}}, {}, "proxy.max_request_bytes"),
    ("max-bytes-bool", {"proxy": {"max_request_bytes": True}}, {}, "proxy.max_request_bytes"),
    ("block-text", {"proxy": {"block_other_hosts": "no"}}, {}, "proxy.block_other_hosts"),
    ("confdir-empty", {"proxy": {"confdir": ""}}, {}, "proxy.confdir"),
    ("proxy-not-table", {"proxy": "127.0.0.1:8080"}, {}, "proxy"),
    ("db-mysql", {"database": {"url": "mysql://x"}}, {}, "database.url"),
    ("db-env-unset", {"database": {"url": "env:SG_UNSET_DB"}}, {}, "database.url"),
    ("db-env-empty-name", {"database": {"url": "env:"}}, {}, "database.url"),
    ("db-int", {"database": {"url": 5}}, {}, "database.url"),
    ("retention-zero", {"audit": {"content_retention_days": 0}}, {}, "audit.content_retention_days"),
    ("capture-text", {"audit": {"capture_content": "yes"}}, {}, "audit.capture_content"),
    ("fail-closed-int", {"budgets": {"fail_closed": 1}}, {}, "budgets.fail_closed"),
    ("unknown-top", {"proxyy": {}}, {}, "proxyy"),
    ("unknown-proxy-key", {"proxy": {"lisen": "127.0.0.1:1"}}, {}, "proxy.lisen"),
    ("unknown-db-key", {"database": {"uri": "sqlite:///x"}}, {}, "database.uri"),
    ("unknown-provider", {"providers": {"opena1": {"api_key": "x"}}}, {}, "providers.opena1"),
    ("unknown-provider-key", {"providers": {"openai": {"apikey": "x"}}}, {}, "providers.openai.apikey"),
    ("provider-not-table", {"providers": {"openai": "sk"}}, {}, "providers.openai"),
    ("upstream-scheme", {"providers": {"openai": {"upstream": "ftp://127.0.0.1:9443"}}}, {}, OPENAI_UP),
    ("upstream-path", {"providers": {"openai": {"upstream": "https://127.0.0.1:9443/v1"}}}, {}, OPENAI_UP),
    ("upstream-int", {"providers": {"openai": {"upstream": 9443}}}, {}, OPENAI_UP),
    ("verify-text", {"providers": {"gemini": {"verify_upstream_tls": "false"}}}, {},
     "providers.gemini.verify_upstream_tls"),
    ("hosts-empty", {"providers": {"azure": {"hosts": []}}}, {}, "providers.azure.hosts"),
    ("hosts-str", {"providers": {"azure": {"hosts": "x.openai.azure.com"}}}, {}, "providers.azure.hosts"),
    ("api-key-int", {"providers": {"openai": {"api_key": 123}}}, {}, "providers.openai.api_key"),
    ("slack-thresholds", {"alerts": {"slack": {"thresholds": [0, 50]}}}, {}, "alerts.slack.thresholds"),
    ("slack-unknown", {"alerts": {"slack": {"hook": "x"}}}, {}, "alerts.slack.hook"),
    ("price-not-provider", {"prices": {"overrides": {"gpt-4o": {"input": 1, "output": 2}}}}, {}, PRICE),
    ("price-unknown-provider", {"prices": {"overrides": {"acme:m": {"input": 1, "output": 2}}}}, {}, PRICE),
    ("price-missing-output", price({"input": 1}), {}, PRICE),
    ("price-negative", price({"input": -1, "output": 2}), {}, PRICE),
    ("price-unknown-field", price({"input": 1, "output": 2, "inptu": 3}), {}, PRICE),
    ("price-not-table", price(2.5), {}, PRICE),
    ("price-bool", price({"input": True, "output": 2}), {}, PRICE),
    ("price-text", price({"input": "cheap", "output": 2}), {}, PRICE),
    ("prices-unknown", {"prices": {"override": {}}}, {}, "prices.override"),
    ("allow-ports-str", {"proxy": {"allow_ports": "443"}}, {}, "proxy.allow_ports"),
    ("allow-ports-zero", {"proxy": {"allow_ports": [0]}}, {}, "proxy.allow_ports"),
    ("allow-ports-bool", {"proxy": {"allow_ports": [True]}}, {}, "proxy.allow_ports"),
    ("allow-dest-str", {"proxy": {"allow_destinations": "10.0.0.0/8"}}, {}, "proxy.allow_destinations"),
    ("allow-dest-bad-cidr", {"proxy": {"allow_destinations": ["10.0.0.0/33"]}}, {}, "proxy.allow_destinations"),
    ("allow-dest-bad-port", {"proxy": {"allow_destinations": ["git.internal:99999"]}}, {}, "proxy.allow_destinations"),
    ("upstream-timeout-zero", {"proxy": {"upstream_timeout_seconds": 0}}, {}, "proxy.upstream_timeout_seconds"),
    ("idle-timeout-text", {"proxy": {"stream_idle_timeout_seconds": "5m"}}, {}, "proxy.stream_idle_timeout_seconds"),
    ("header-timeout-neg", {"proxy": {"header_timeout_seconds": -1}}, {}, "proxy.header_timeout_seconds"),
    ("header-bytes-float", {"proxy": {"max_header_bytes": 1.5}}, {}, "proxy.max_header_bytes"),
]


@pytest.mark.parametrize(("raw", "env", "key"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_value_raises_config_error_naming_the_key(raw: dict[str, Any], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(raw, env)
    assert key in str(info.value)


def test_unset_env_message_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"database\.url.*SG_UNSET_DB"):
        parse({"database": {"url": "env:SG_UNSET_DB"}})


# -- through the real command --------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [('[proxy]\nlisten = "nope"\n', "proxy.listen"), ('[database]\nurl = "mysql://x"\n', "database.url")],
)
def test_serve_refuses_to_start_and_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "spendgate.toml"
    cfg.write_text(toml)
    env = {k: v for k, v in os.environ.items() if k != "SPENDGATE_CONFIG"} | {"COLUMNS": "500"}
    cp = subprocess.run([str(SPENDGATE), "serve", "--config", str(cfg)], capture_output=True, text=True,
                        timeout=30, cwd=tmp_path, env=env)
    out = re.sub(r"\s+", " ", cp.stdout + cp.stderr)
    assert cp.returncode != 0
    assert key in out
    assert "Traceback" not in out
    assert not (tmp_path / "spendgate.db").exists()  # it stopped before touching anything
