"""Configuration: the contract's TOML, parsed once into typed, frozen settings.

This is the only module that reads the config file or the environment. Every
wrong value raises `ConfigError` naming the key and the fix, so `serve` fails
at start-up instead of misbehaving under traffic.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from spendgate.access import parse_destination
from spendgate.money import parse_amount
from spendgate.pricing import PriceOverride
from spendgate.providers import BUILTIN_PROVIDERS, ProviderSpec

DEFAULT_CONFIG_NAME = "spendgate.toml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# One dataclass per TOML table. Their defaults are the only defaults: `parse_settings` reads
# every missing key from them.


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
class DatabaseSettings:
    url: str = "sqlite:///spendgate.db"


@dataclass(frozen=True)
class MetricsSettings:
    listen: HostPort = HostPort("127.0.0.1", 9464)


@dataclass(frozen=True)
class AuditSettings:
    capture_content: bool = False
    content_retention_days: int = 30


@dataclass(frozen=True)
class BudgetSettings:
    fail_closed: bool = True
    default_max_output_tokens: int = 4096
    reservation_ttl_seconds: int = 600


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
    configured: bool = False  # the config file has a [providers.NAME] table

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
class AlertSettings:
    slack: SlackSettings = field(default_factory=SlackSettings)
    spike: SpikeSettings = field(default_factory=SpikeSettings)
    backstop: BackstopSettings = field(default_factory=BackstopSettings)


@dataclass(frozen=True)
class PriceSettings:
    overrides: Mapping[str, PriceOverride] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    config_path: Path | None = None
    proxy: ProxySettings = field(default_factory=ProxySettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    providers: tuple[ProviderSettings, ...] = ()
    alerts: AlertSettings = field(default_factory=AlertSettings)
    prices: PriceSettings = field(default_factory=PriceSettings)

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
            raise ConfigError(f"config file {cfg_path} does not exist: "
                              "create it (see config/spendgate.example.toml) or drop --config")
        try:
            raw = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {cfg_path} is not valid TOML: {e}") from None
    return parse_settings(raw, env, cfg_path)


def parse_settings(raw: Mapping[str, Any], env: Mapping[str, str], cfg_path: Path | None = None) -> Settings:
    _known(raw, "", {"proxy", "database", "metrics", "audit", "budgets", "providers", "alerts", "prices"})
    P = ProxySettings()
    p = _section(raw, "proxy", P)
    proxy = ProxySettings(
        listen=_hostport(p.get("listen", str(P.listen)), "proxy.listen"),
        confdir=Path(_str(p.get("confdir", "~/.spendgate"), "proxy.confdir", env)).expanduser(),
        max_request_bytes=_posint(p.get("max_request_bytes", P.max_request_bytes), "proxy.max_request_bytes"),
        block_other_hosts=_bool(p.get("block_other_hosts", P.block_other_hosts), "proxy.block_other_hosts"),
        allow_ports=_ports(p.get("allow_ports", list(P.allow_ports)), "proxy.allow_ports"),
        allow_destinations=_destinations(p.get("allow_destinations", list(P.allow_destinations)),
                                         "proxy.allow_destinations"),
        upstream_timeout_seconds=_posfloat(p.get("upstream_timeout_seconds", P.upstream_timeout_seconds),
                                           "proxy.upstream_timeout_seconds"),
        stream_idle_timeout_seconds=_posfloat(p.get("stream_idle_timeout_seconds", P.stream_idle_timeout_seconds),
                                              "proxy.stream_idle_timeout_seconds"),
        header_timeout_seconds=_posfloat(p.get("header_timeout_seconds", P.header_timeout_seconds),
                                         "proxy.header_timeout_seconds"),
        max_header_bytes=_posint(p.get("max_header_bytes", P.max_header_bytes), "proxy.max_header_bytes"),
    )
    D = DatabaseSettings()
    db = _section(raw, "database", D)
    database = DatabaseSettings(url=_database_url(_str(db.get("url", D.url), "database.url", env), cfg_path))
    M = MetricsSettings()
    metrics = MetricsSettings(listen=_hostport(_section(raw, "metrics", M).get("listen", str(M.listen)),
                                               "metrics.listen"))
    A = AuditSettings()
    a = _section(raw, "audit", A)
    audit = AuditSettings(
        capture_content=_bool(a.get("capture_content", A.capture_content), "audit.capture_content"),
        content_retention_days=_posint(a.get("content_retention_days", A.content_retention_days),
                                       "audit.content_retention_days"),
    )
    B = BudgetSettings()
    b = _section(raw, "budgets", B)
    budgets = BudgetSettings(
        fail_closed=_bool(b.get("fail_closed", B.fail_closed), "budgets.fail_closed"),
        default_max_output_tokens=_posint(b.get("default_max_output_tokens", B.default_max_output_tokens),
                                          "budgets.default_max_output_tokens"),
        reservation_ttl_seconds=_posint(b.get("reservation_ttl_seconds", B.reservation_ttl_seconds),
                                        "budgets.reservation_ttl_seconds"),
    )
    return Settings(
        config_path=cfg_path, proxy=proxy, database=database, metrics=metrics, audit=audit, budgets=budgets,
        providers=_providers(_table(raw, "providers"), env), alerts=_alerts(_table(raw, "alerts"), env),
        prices=PriceSettings(_price_overrides(_table(raw, "prices"))),
    )


def _alerts(raw: Mapping[str, Any], env: Mapping[str, str]) -> AlertSettings:
    _known(raw, "alerts.", {"slack", "spike", "backstop"})
    S = SlackSettings()
    sl = _section(raw, "slack", S, "alerts.")
    thresholds = sl.get("thresholds", list(S.thresholds))
    if not isinstance(thresholds, list) or not all(isinstance(t, int) and 0 < t <= 1000 for t in thresholds):
        raise ConfigError("alerts.slack.thresholds must be a list of whole percentages, e.g. [50, 80, 100]")
    slack = SlackSettings(
        webhook_url=_optional_secret(sl.get("webhook_url"), "alerts.slack.webhook_url", env),
        bot_token=_optional_secret(sl.get("bot_token"), "alerts.slack.bot_token", env),
        channel=_optional_str(sl.get("channel"), "alerts.slack.channel", env),
        thresholds=tuple(sorted(set(thresholds))),
        api_url=_str(sl.get("api_url", S.api_url), "alerts.slack.api_url", env),
    )
    K = SpikeSettings()
    sp = _section(raw, "spike", K, "alerts.")
    spike = SpikeSettings(
        window_seconds=_posint(sp.get("window_seconds", K.window_seconds), "alerts.spike.window_seconds"),
        baseline_seconds=_posint(sp.get("baseline_seconds", K.baseline_seconds), "alerts.spike.baseline_seconds"),
        factor=_posfloat(sp.get("factor", K.factor), "alerts.spike.factor"),
        min_usd=_usd_amount(sp.get("min_usd", K.min_usd), "alerts.spike.min_usd"),
        min_requests=_posint(sp.get("min_requests", K.min_requests), "alerts.spike.min_requests"),
    )
    if spike.baseline_seconds <= spike.window_seconds:
        raise ConfigError("alerts.spike.baseline_seconds must be longer than alerts.spike.window_seconds")
    T = BackstopSettings()
    bs = _section(raw, "backstop", T, "alerts.")
    backstop = BackstopSettings(
        interval_seconds=_posint(bs.get("interval_seconds", T.interval_seconds), "alerts.backstop.interval_seconds"),
        budget_usd=_usd_amount(bs["budget_usd"], "alerts.backstop.budget_usd") if "budget_usd" in bs else None,
        tolerance=_posfloat(bs.get("tolerance", T.tolerance), "alerts.backstop.tolerance"),
        lookback_days=_posint(bs.get("lookback_days", T.lookback_days), "alerts.backstop.lookback_days"),
    )
    return AlertSettings(slack, spike, backstop)


def _section(raw: Mapping[str, Any], name: str, defaults: object, prefix: str = "") -> Mapping[str, Any]:
    """The TOML table `name`, refusing keys its dataclass does not have."""
    table = _table(raw, name, prefix)
    _known(table, f"{prefix}{name}.", {f.name for f in fields(defaults)})  # type: ignore[arg-type]
    return table


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
            raise ConfigError(f"{key}.hosts must be a non-empty list of host names "
                              "or globs like \"*.openai.azure.com\"")
        upstream = None
        if "upstream" in p:
            upstream = _upstream(p["upstream"], f"{key}.upstream")
        out.append(
            ProviderSettings(
                name=name,
                spec=spec,
                hosts=tuple(h.lower() for h in hosts),
                api_key=api_key,
                api_key_source=(api_key_raw if isinstance(api_key_raw, str) and api_key_raw.startswith("env:")
                                else ("inline" if api_key else None)),
                upstream=upstream,
                verify_upstream_tls=_bool(p.get("verify_upstream_tls", True), f"{key}.verify_upstream_tls"),
                admin_api_key=_optional_secret(p.get("admin_api_key"), f"{key}.admin_api_key", env),
                configured=name in raw,
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


def _database_url(url: str, cfg_path: Path | None) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        # psycopg 3 is the driver we ship; the bare scheme would pick psycopg2.
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:" and not path.startswith("~") and not Path(path).is_absolute() and cfg_path:
            # Relative to the config file, not to wherever a CLI command happens to run.
            return "sqlite:///" + str((cfg_path.resolve().parent / path))
        return "sqlite:///" + str(Path(path).expanduser()) if path.startswith("~") else url
    if not (url.startswith("sqlite:") or url.startswith("postgresql+psycopg://")):
        raise ConfigError(
            f"database.url must be sqlite:///PATH or postgresql+psycopg://USER@HOST/DB "
            f"(got scheme {url.split(':', 1)[0]!r})"
        )
    return url
