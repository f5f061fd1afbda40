"""Configuration: the contract's TOML, parsed once into typed, frozen settings.

This is the only module that reads the config file or the environment. Every
wrong value raises `ConfigError` naming the key and the fix, so `serve` fails
at start-up instead of misbehaving under traffic.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from spendgate.access import parse_destination
from spendgate.pricing import PriceOverride, parse_amount
from spendgate.providers import BUILTIN_PROVIDERS, ProviderSpec

DEFAULT_CONFIG_NAME = "spendgate.toml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ProxySettings:
    listen: HostPort = HostPort("127.0.0.1", 8080)
    confdir: Path = Path("~/.spendgate").expanduser()
    max_request_bytes: int = 32 * 1024 * 1024
    block_other_hosts: bool = False
    allow_ports: tuple[int, ...] = (443,)
    allow_destinations: tuple[str, ...] = ()  # CIDRs, "host:port" or "ip:port": exceptions to the refused networks
    upstream_timeout_seconds: float = 600.0
    stream_idle_timeout_seconds: float = 300.0
    header_timeout_seconds: float = 30.0
    max_header_bytes: int = 65536


@dataclass(frozen=True)
class Upstream:
    scheme: str
    host: str
    port: int


@dataclass(frozen=True)
class ProviderSettings:
    name: str
    spec: ProviderSpec
    hosts: tuple[str, ...]
    api_key: str | None
    api_key_source: str | None  # e.g. "env:OPENAI_API_KEY"; safe to print, the value is not
    upstream: Upstream | None
    verify_upstream_tls: bool
    admin_api_key: str | None = None

    def __repr__(self) -> str:  # never print the key
        return f"ProviderSettings(name={self.name!r}, hosts={self.hosts!r}, upstream={self.upstream!r})"


@dataclass(frozen=True)
class SlackSettings:
    webhook_url: str | None = None
    bot_token: str | None = None
    channel: str | None = None
    thresholds: tuple[int, ...] = (50, 80, 100)
    api_url: str = "https://slack.com/api/"  # Web API base for bot_token; tests point it at a local server

    def __repr__(self) -> str:
        return f"SlackSettings(configured={bool(self.webhook_url or self.bot_token)}, thresholds={self.thresholds})"


@dataclass(frozen=True)
class SpikeSettings:
    """A user's spend or request rate over `window_seconds` far above their own recent baseline."""

    window_seconds: int = 300
    baseline_seconds: int = 3600
    factor: float = 10.0
    min_usd: Decimal = Decimal("1")
    min_requests: int = 50


@dataclass(frozen=True)
class BackstopSettings:
    """Provider-reported spend (organization cost APIs, needs admin keys) against budget and gateway totals."""

    interval_seconds: int = 3600
    budget_usd: Decimal | None = None
    tolerance: float = 0.2  # alert when provider and gateway totals differ by more than this share
    lookback_days: int = 1


@dataclass(frozen=True)
class Settings:
    config_path: Path | None = None
    proxy: ProxySettings = field(default_factory=ProxySettings)
    database_url: str = "sqlite:///spendgate.db"
    metrics_listen: HostPort = HostPort("127.0.0.1", 9464)
    capture_content: bool = False
    content_retention_days: int = 30
    fail_closed: bool = True
    default_max_output_tokens: int = 4096
    reservation_ttl_seconds: int = 600
    providers: tuple[ProviderSettings, ...] = ()
    slack: SlackSettings = field(default_factory=SlackSettings)
    spike: SpikeSettings = field(default_factory=SpikeSettings)
    backstop: BackstopSettings = field(default_factory=BackstopSettings)
    price_overrides: Mapping[str, PriceOverride] = field(default_factory=dict)

    def provider(self, name: str) -> ProviderSettings | None:
        for p in self.providers:
            if p.name == name:
                return p
        return None


def resolve_config_path(explicit: str | Path | None) -> Path | None:
    """`--config`, then `$SPENDGATE_CONFIG`, then `./spendgate.toml`, else built-in defaults."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("SPENDGATE_CONFIG")
    if env:
        return Path(env)
    local = Path(DEFAULT_CONFIG_NAME)
    return local if local.exists() else None


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the config; `path=None` applies the resolution order above."""
    env = os.environ if environ is None else environ
    cfg_path = resolve_config_path(path)
    raw: dict[str, Any] = {}
    if cfg_path is not None:
        if not cfg_path.exists():
            raise ConfigError(f"config file {cfg_path} does not exist: create it (see config/spendgate.example.toml) or drop --config")
        try:
            raw = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {cfg_path} is not valid TOML: {e}") from None
    return parse_settings(raw, env, cfg_path)


def parse_settings(raw: Mapping[str, Any], env: Mapping[str, str], cfg_path: Path | None = None) -> Settings:
    _known(raw, "", {"proxy", "database", "metrics", "audit", "budgets", "providers", "alerts", "prices"})
    proxy_raw = _table(raw, "proxy")
    _known(proxy_raw, "proxy.", {
        "listen", "confdir", "max_request_bytes", "block_other_hosts", "allow_ports", "allow_destinations",
        "upstream_timeout_seconds", "stream_idle_timeout_seconds", "header_timeout_seconds", "max_header_bytes",
    })
    proxy = ProxySettings(
        listen=_hostport(proxy_raw.get("listen", "127.0.0.1:8080"), "proxy.listen"),
        confdir=Path(_str(proxy_raw.get("confdir", "~/.spendgate"), "proxy.confdir", env)).expanduser(),
        max_request_bytes=_posint(proxy_raw.get("max_request_bytes", 32 * 1024 * 1024), "proxy.max_request_bytes"),
        block_other_hosts=_bool(proxy_raw.get("block_other_hosts", False), "proxy.block_other_hosts"),
        allow_ports=_ports(proxy_raw.get("allow_ports", [443]), "proxy.allow_ports"),
        allow_destinations=_destinations(proxy_raw.get("allow_destinations", []), "proxy.allow_destinations"),
        upstream_timeout_seconds=_posfloat(proxy_raw.get("upstream_timeout_seconds", 600), "proxy.upstream_timeout_seconds"),
        stream_idle_timeout_seconds=_posfloat(proxy_raw.get("stream_idle_timeout_seconds", 300),
                                              "proxy.stream_idle_timeout_seconds"),
        header_timeout_seconds=_posfloat(proxy_raw.get("header_timeout_seconds", 30), "proxy.header_timeout_seconds"),
        max_header_bytes=_posint(proxy_raw.get("max_header_bytes", 65536), "proxy.max_header_bytes"),
    )
    db_raw = _table(raw, "database")
    _known(db_raw, "database.", {"url"})
    db_url = _database_url(_str(db_raw.get("url", "sqlite:///spendgate.db"), "database.url", env))
    metrics_raw = _table(raw, "metrics")
    _known(metrics_raw, "metrics.", {"listen"})
    audit_raw = _table(raw, "audit")
    _known(audit_raw, "audit.", {"capture_content", "content_retention_days"})
    budgets_raw = _table(raw, "budgets")
    _known(budgets_raw, "budgets.", {"fail_closed", "default_max_output_tokens", "reservation_ttl_seconds"})
    providers = _providers(_table(raw, "providers"), env)
    alerts_raw = _table(raw, "alerts")
    _known(alerts_raw, "alerts.", {"slack", "spike", "backstop"})
    slack_raw = _table(alerts_raw, "slack", "alerts.")
    _known(slack_raw, "alerts.slack.", {"webhook_url", "bot_token", "channel", "thresholds", "api_url"})
    thresholds = slack_raw.get("thresholds", [50, 80, 100])
    if not isinstance(thresholds, list) or not all(isinstance(t, int) and 0 < t <= 1000 for t in thresholds):
        raise ConfigError("alerts.slack.thresholds must be a list of whole percentages, e.g. [50, 80, 100]")
    slack = SlackSettings(
        webhook_url=_optional_secret(slack_raw.get("webhook_url"), "alerts.slack.webhook_url", env),
        bot_token=_optional_secret(slack_raw.get("bot_token"), "alerts.slack.bot_token", env),
        channel=_optional_str(slack_raw.get("channel"), "alerts.slack.channel", env),
        thresholds=tuple(sorted(set(thresholds))),
        api_url=_str(slack_raw.get("api_url", "https://slack.com/api/"), "alerts.slack.api_url", env),
    )
    spike_raw = _table(alerts_raw, "spike", "alerts.")
    _known(spike_raw, "alerts.spike.", {"window_seconds", "baseline_seconds", "factor", "min_usd", "min_requests"})
    spike = SpikeSettings(
        window_seconds=_posint(spike_raw.get("window_seconds", 300), "alerts.spike.window_seconds"),
        baseline_seconds=_posint(spike_raw.get("baseline_seconds", 3600), "alerts.spike.baseline_seconds"),
        factor=_posfloat(spike_raw.get("factor", 10.0), "alerts.spike.factor"),
        min_usd=_usd_amount(spike_raw.get("min_usd", 1), "alerts.spike.min_usd"),
        min_requests=_posint(spike_raw.get("min_requests", 50), "alerts.spike.min_requests"),
    )
    if spike.baseline_seconds <= spike.window_seconds:
        raise ConfigError("alerts.spike.baseline_seconds must be longer than alerts.spike.window_seconds")
    bs_raw = _table(alerts_raw, "backstop", "alerts.")
    _known(bs_raw, "alerts.backstop.", {"interval_seconds", "budget_usd", "tolerance", "lookback_days"})
    backstop = BackstopSettings(
        interval_seconds=_posint(bs_raw.get("interval_seconds", 3600), "alerts.backstop.interval_seconds"),
        budget_usd=_usd_amount(bs_raw["budget_usd"], "alerts.backstop.budget_usd") if "budget_usd" in bs_raw else None,
        tolerance=_posfloat(bs_raw.get("tolerance", 0.2), "alerts.backstop.tolerance"),
        lookback_days=_posint(bs_raw.get("lookback_days", 1), "alerts.backstop.lookback_days"),
    )
    return Settings(
        config_path=cfg_path,
        spike=spike,
        backstop=backstop,
        proxy=proxy,
        database_url=db_url,
        metrics_listen=_hostport(metrics_raw.get("listen", "127.0.0.1:9464"), "metrics.listen"),
        capture_content=_bool(audit_raw.get("capture_content", False), "audit.capture_content"),
        content_retention_days=_posint(audit_raw.get("content_retention_days", 30), "audit.content_retention_days"),
        fail_closed=_bool(budgets_raw.get("fail_closed", True), "budgets.fail_closed"),
        default_max_output_tokens=_posint(budgets_raw.get("default_max_output_tokens", 4096), "budgets.default_max_output_tokens"),
        reservation_ttl_seconds=_posint(budgets_raw.get("reservation_ttl_seconds", 600), "budgets.reservation_ttl_seconds"),
        providers=providers,
        slack=slack,
        price_overrides=_price_overrides(_table(raw, "prices")),
    )


def _providers(raw: Mapping[str, Any], env: Mapping[str, str]) -> tuple[ProviderSettings, ...]:
    out: list[ProviderSettings] = []
    for name in raw:
        if name not in BUILTIN_PROVIDERS:
            raise ConfigError(
                f"providers.{name}: unknown provider; use one of {', '.join(sorted(BUILTIN_PROVIDERS))}"
            )
    for name, spec in BUILTIN_PROVIDERS.items():
        p = raw.get(name, {})
        key = f"providers.{name}"
        if not isinstance(p, dict):
            raise ConfigError(f"{key} must be a table, e.g. [{key}]")
        _known(p, key + ".", {"api_key", "upstream", "verify_upstream_tls", "hosts", "admin_api_key"})
        api_key_raw = p.get("api_key", f"env:{spec.default_key_env}")
        api_key = _optional_secret(api_key_raw, f"{key}.api_key", env)
        hosts = p.get("hosts", list(spec.hosts))
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
            raise ConfigError(f"{key}.hosts must be a non-empty list of host names or globs like \"*.openai.azure.com\"")
        upstream = None
        if "upstream" in p:
            upstream = _upstream(p["upstream"], f"{key}.upstream")
        out.append(
            ProviderSettings(
                name=name,
                spec=spec,
                hosts=tuple(h.lower() for h in hosts),
                api_key=api_key,
                api_key_source=api_key_raw if isinstance(api_key_raw, str) and api_key_raw.startswith("env:") else ("inline" if api_key else None),
                upstream=upstream,
                verify_upstream_tls=_bool(p.get("verify_upstream_tls", True), f"{key}.verify_upstream_tls"),
                admin_api_key=_optional_secret(p.get("admin_api_key"), f"{key}.admin_api_key", env),
            )
        )
    return tuple(out)


def _price_overrides(raw: Mapping[str, Any]) -> dict[str, PriceOverride]:
    _known(raw, "prices.", {"overrides"})
    ov = raw.get("overrides", {})
    if not isinstance(ov, dict):
        raise ConfigError("prices.overrides must be a table of \"provider:model\" = { input = …, output = … }")
    out: dict[str, PriceOverride] = {}
    for ref, v in ov.items():
        key = f'prices.overrides."{ref}"'
        if ":" not in ref or ref.split(":", 1)[0] not in BUILTIN_PROVIDERS:
            raise ConfigError(f"{key}: name it \"provider:model\", e.g. \"openai:gpt-4o\"")
        if not isinstance(v, dict):
            raise ConfigError(f"{key} must be a table like {{ input = 2.5, output = 10.0 }} (USD per million tokens)")
        try:
            out[ref] = PriceOverride.parse(v)
        except ValueError as e:
            raise ConfigError(f"{key}: {e} (USD per million tokens: input, output, cache_read, cache_write)") from None
    return out


def _known(table: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{prefix}{k}: unknown setting; known here: {', '.join(sorted(allowed))}")


def _table(raw: Mapping[str, Any], name: str, prefix: str = "") -> Mapping[str, Any]:
    v = raw.get(name, {})
    if not isinstance(v, dict):
        raise ConfigError(f"{prefix}{name} must be a table, e.g. [{prefix}{name}]")
    return v


def _env_ref(value: str, key: str, env: Mapping[str, str], required: bool = True) -> str | None:
    if value.startswith("env:"):
        var = value[4:]
        if not var:
            raise ConfigError(f"{key}: \"env:\" needs a variable name, e.g. \"env:OPENAI_API_KEY\"")
        got = env.get(var)
        if got is None or got == "":
            if required:
                raise ConfigError(f"{key}: environment variable {var} is not set; export it or change {key}")
            return None
        return got
    return value


def _str(v: Any, key: str, env: Mapping[str, str]) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key} must be a non-empty string")
    out = _env_ref(v, key, env)
    assert out is not None
    return out


def _optional_str(v: Any, key: str, env: Mapping[str, str]) -> str | None:
    if v is None:
        return None
    return _str(v, key, env)


def _optional_secret(v: Any, key: str, env: Mapping[str, str]) -> str | None:
    """Like `_optional_str`, but an unset env var means "not configured" (`doctor` reports it)."""
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key} must be a string, e.g. \"env:NAME\"")
    return _env_ref(v, key, env, required=False)


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false (got {v!r})")
    return v


def _posint(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{key} must be a positive whole number (got {v!r})")
    return v


def _posfloat(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ConfigError(f"{key} must be a positive number (got {v!r})")
    return float(v)


def _usd_amount(v: Any, key: str) -> Decimal:
    try:
        return parse_amount(v)
    except ValueError:
        raise ConfigError(f"{key} must be a non-negative amount in USD, e.g. 100 (got {v!r})") from None


def _ports(v: Any, key: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in v):
        raise ConfigError(f"{key} must be a list of port numbers, e.g. [443] (got {v!r})")
    return tuple(sorted(set(v)))


def _destinations(v: Any, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(d, str) and d for d in v):
        raise ConfigError(f"{key} must be a list like [\"10.1.2.0/24\", \"git.internal:443\"] (got {v!r})")
    for d in v:
        try:
            parse_destination(d)
        except ValueError as e:
            raise ConfigError(f"{key}: {d!r} is not a network, host:port or ip:port ({e})") from None
    return tuple(v)


def _hostport(v: Any, key: str) -> HostPort:
    if not isinstance(v, str) or ":" not in v:
        raise ConfigError(f"{key} must be \"HOST:PORT\", e.g. \"127.0.0.1:8080\" (got {v!r})")
    host, _, port_s = v.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{key}: port {port_s!r} is not a number; write \"HOST:PORT\"") from None
    if not host or not 0 <= port <= 65535:
        raise ConfigError(f"{key} must be \"HOST:PORT\" with a port 0-65535 (got {v!r})")
    return HostPort(host, port)


def _upstream(v: Any, key: str) -> Upstream:
    if not isinstance(v, str):
        raise ConfigError(f"{key} must be a URL like \"https://127.0.0.1:9443\"")
    u = urlsplit(v)
    if u.scheme not in ("https", "http") or not u.hostname:
        raise ConfigError(f"{key} must be a URL like \"https://127.0.0.1:9443\" (got {v!r})")
    if u.path not in ("", "/"):
        raise ConfigError(f"{key}: a path is not supported, give scheme://host:port only")
    return Upstream(u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80))


def _database_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        # psycopg 3 is the driver we ship; the bare scheme would pick psycopg2.
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if not (url.startswith("sqlite:") or url.startswith("postgresql+psycopg://")):
        raise ConfigError(
            f"database.url must be sqlite:///PATH or postgresql+psycopg://USER@HOST/DB (got scheme {url.split(':', 1)[0]!r})"
        )
    return url
