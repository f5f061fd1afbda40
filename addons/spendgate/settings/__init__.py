"""Configuration: the contract's TOML, parsed once into typed, frozen settings.

This is the only module that reads the config file or the environment. Every
wrong value raises `ConfigError` naming the key and the fix, so `serve` fails
at start-up instead of misbehaving under traffic.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping

from spendgate.pricing import PriceOverride
from spendgate.providers import BUILTIN_PROVIDERS, ProviderSpec
from spendgate.settings import values as val
from spendgate.settings.values import ConfigError, HostPort, Upstream

__all__ = ["ConfigError", "HostPort", "Settings", "Upstream", "load_settings", "parse_settings"]

DEFAULT_CONFIG_NAME = "spendgate.toml"


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
    public_url: str | None = None  # "http://HOST:PORT" developers use; None: derived from listen


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
    clamp_output: bool = True  # lower a request's output limit to what the remaining cap pays for
    min_output_tokens: int = 256  # ... but refuse (429) when not even this many fit
    allow_unmetered: tuple[str, ...] = ()  # endpoint kinds the gateway cannot price up front, allowed anyway


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
    unknown_model: str = "refuse"  # a model with no price, for a caller under a cap: "refuse" or "fallback"
    fallback: PriceOverride = PriceOverride(Decimal(15), Decimal(75))  # USD per million tokens

    @property
    def fallback_rates(self) -> PriceOverride | None:
        """The rates unknown models are priced at; None while unknown_model = "refuse"."""
        return self.fallback if self.unknown_model == "fallback" else None


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"  # debug | info | warning | error
    format: str = "text"  # text | json (one object a line)


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
    log: LogSettings = field(default_factory=LogSettings)

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
    val.known(raw, "", {"proxy", "database", "metrics", "audit", "budgets", "providers", "alerts", "prices", "log"})
    P = ProxySettings()
    p = _section(raw, "proxy", P)
    proxy = ProxySettings(
        listen=val.hostport(p.get("listen", str(P.listen)), "proxy.listen"),
        confdir=Path(val.str_value(p.get("confdir", "~/.spendgate"), "proxy.confdir", env)).expanduser(),
        max_request_bytes=val.posint(p.get("max_request_bytes", P.max_request_bytes), "proxy.max_request_bytes"),
        block_other_hosts=val.bool_value(p.get("block_other_hosts", P.block_other_hosts), "proxy.block_other_hosts"),
        allow_ports=val.ports(p.get("allow_ports", list(P.allow_ports)), "proxy.allow_ports"),
        allow_destinations=val.destinations(p.get("allow_destinations", list(P.allow_destinations)),
                                         "proxy.allow_destinations"),
        upstream_timeout_seconds=val.posfloat(p.get("upstream_timeout_seconds", P.upstream_timeout_seconds),
                                           "proxy.upstream_timeout_seconds"),
        stream_idle_timeout_seconds=val.posfloat(p.get("stream_idle_timeout_seconds", P.stream_idle_timeout_seconds),
                                              "proxy.stream_idle_timeout_seconds"),
        header_timeout_seconds=val.posfloat(p.get("header_timeout_seconds", P.header_timeout_seconds),
                                         "proxy.header_timeout_seconds"),
        max_header_bytes=val.posint(p.get("max_header_bytes", P.max_header_bytes), "proxy.max_header_bytes"),
        public_url=val.public_url(p.get("public_url"), "proxy.public_url", env),
    )
    D = DatabaseSettings()
    db = _section(raw, "database", D)
    url = val.str_value(db.get("url", D.url), "database.url", env)
    database = DatabaseSettings(url=val.database_url(url, cfg_path))
    M = MetricsSettings()
    metrics = MetricsSettings(listen=val.hostport(_section(raw, "metrics", M).get("listen", str(M.listen)),
                                               "metrics.listen"))
    A = AuditSettings()
    a = _section(raw, "audit", A)
    audit = AuditSettings(
        capture_content=val.bool_value(a.get("capture_content", A.capture_content), "audit.capture_content"),
        content_retention_days=val.posint(a.get("content_retention_days", A.content_retention_days),
                                       "audit.content_retention_days"),
    )
    B = BudgetSettings()
    b = _section(raw, "budgets", B)
    budgets = BudgetSettings(
        fail_closed=val.bool_value(b.get("fail_closed", B.fail_closed), "budgets.fail_closed"),
        default_max_output_tokens=val.posint(b.get("default_max_output_tokens", B.default_max_output_tokens),
                                          "budgets.default_max_output_tokens"),
        reservation_ttl_seconds=val.posint(b.get("reservation_ttl_seconds", B.reservation_ttl_seconds),
                                        "budgets.reservation_ttl_seconds"),
        clamp_output=val.bool_value(b.get("clamp_output", B.clamp_output), "budgets.clamp_output"),
        min_output_tokens=val.posint(b.get("min_output_tokens", B.min_output_tokens), "budgets.min_output_tokens"),
        allow_unmetered=_unmetered(b.get("allow_unmetered", list(B.allow_unmetered))),
    )
    return Settings(
        config_path=cfg_path, proxy=proxy, database=database, metrics=metrics, audit=audit, budgets=budgets,
        providers=_providers(val.table(raw, "providers"), env), alerts=_alerts(val.table(raw, "alerts"), env),
        prices=_prices(val.table(raw, "prices")),
        log=_log(val.table(raw, "log")),
    )


def _log(raw: Mapping[str, Any]) -> LogSettings:
    val.known(raw, "log.", {"level", "format"})
    level = raw.get("level", LogSettings.level)
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f'log.level must be "debug", "info", "warning" or "error" (got {level!r})')
    fmt = raw.get("format", LogSettings.format)
    if fmt not in ("text", "json"):
        raise ConfigError(f'log.format must be "text" or "json" (got {fmt!r})')
    return LogSettings(level, fmt)


def _alerts(raw: Mapping[str, Any], env: Mapping[str, str]) -> AlertSettings:
    val.known(raw, "alerts.", {"slack", "spike", "backstop"})
    S = SlackSettings()
    sl = _section(raw, "slack", S, "alerts.")
    thresholds = sl.get("thresholds", list(S.thresholds))
    if not isinstance(thresholds, list) or not all(isinstance(t, int) and 0 < t <= 1000 for t in thresholds):
        raise ConfigError("alerts.slack.thresholds must be a list of whole percentages, e.g. [50, 80, 100]")
    slack = SlackSettings(
        webhook_url=val.optional_secret(sl.get("webhook_url"), "alerts.slack.webhook_url", env),
        bot_token=val.optional_secret(sl.get("bot_token"), "alerts.slack.bot_token", env),
        channel=val.optional_str(sl.get("channel"), "alerts.slack.channel", env),
        thresholds=tuple(sorted(set(thresholds))),
        api_url=val.str_value(sl.get("api_url", S.api_url), "alerts.slack.api_url", env),
    )
    K = SpikeSettings()
    sp = _section(raw, "spike", K, "alerts.")
    spike = SpikeSettings(
        window_seconds=val.posint(sp.get("window_seconds", K.window_seconds), "alerts.spike.window_seconds"),
        baseline_seconds=val.posint(sp.get("baseline_seconds", K.baseline_seconds), "alerts.spike.baseline_seconds"),
        factor=val.posfloat(sp.get("factor", K.factor), "alerts.spike.factor"),
        min_usd=val.usd_amount(sp.get("min_usd", K.min_usd), "alerts.spike.min_usd"),
        min_requests=val.posint(sp.get("min_requests", K.min_requests), "alerts.spike.min_requests"),
    )
    if spike.baseline_seconds <= spike.window_seconds:
        raise ConfigError("alerts.spike.baseline_seconds must be longer than alerts.spike.window_seconds")
    T = BackstopSettings()
    bs = _section(raw, "backstop", T, "alerts.")
    backstop = BackstopSettings(
        interval_seconds=val.posint(bs.get("interval_seconds", T.interval_seconds), "alerts.backstop.interval_seconds"),
        budget_usd=val.usd_amount(bs["budget_usd"], "alerts.backstop.budget_usd") if "budget_usd" in bs else None,
        tolerance=val.posfloat(bs.get("tolerance", T.tolerance), "alerts.backstop.tolerance"),
        lookback_days=val.posint(bs.get("lookback_days", T.lookback_days), "alerts.backstop.lookback_days"),
    )
    return AlertSettings(slack, spike, backstop)


def _section(raw: Mapping[str, Any], name: str, defaults: object, prefix: str = "") -> Mapping[str, Any]:
    """The TOML table `name`, refusing keys its dataclass does not have."""
    table = val.table(raw, name, prefix)
    val.known(table, f"{prefix}{name}.", {f.name for f in fields(defaults)})  # type: ignore[arg-type]
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
        val.known(p, key + ".", {"api_key", "upstream", "verify_upstream_tls", "hosts", "admin_api_key"})
        api_key_raw = p.get("api_key", f"env:{spec.default_key_env}")
        api_key = val.optional_secret(api_key_raw, f"{key}.api_key", env)
        hosts = p.get("hosts", list(spec.hosts))
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
            raise ConfigError(f"{key}.hosts must be a non-empty list of host names "
                              "or globs like \"*.openai.azure.com\"")
        upstream = None
        if "upstream" in p:
            upstream = val.upstream(p["upstream"], f"{key}.upstream")
        out.append(
            ProviderSettings(
                name=name,
                spec=spec,
                hosts=tuple(h.lower() for h in hosts),
                api_key=api_key,
                api_key_source=(api_key_raw if isinstance(api_key_raw, str) and api_key_raw.startswith("env:")
                                else ("inline" if api_key else None)),
                upstream=upstream,
                verify_upstream_tls=val.bool_value(p.get("verify_upstream_tls", True), f"{key}.verify_upstream_tls"),
                admin_api_key=val.optional_secret(p.get("admin_api_key"), f"{key}.admin_api_key", env),
                configured=name in raw,
            )
        )
    return tuple(out)


_PRICE_KEYS = ("input, output, cache_read, cache_write, input_audio, output_audio (USD per million tokens), "
               "per_image, per_minute, per_million_characters")


def _prices(raw: Mapping[str, Any]) -> PriceSettings:
    P = PriceSettings()
    val.known(raw, "prices.", {"overrides", "unknown_model", "fallback"})
    unknown_model = raw.get("unknown_model", P.unknown_model)
    if unknown_model not in ("refuse", "fallback"):
        raise ConfigError(f'prices.unknown_model must be "refuse" or "fallback" (got {unknown_model!r})')
    fallback = P.fallback
    if "fallback" in raw:
        fallback = _price_table(raw["fallback"], "prices.fallback")
    ov = raw.get("overrides", {})
    if not isinstance(ov, dict):
        raise ConfigError("prices.overrides must be a table of \"provider:model\" = { input = …, output = … }")
    overrides: dict[str, PriceOverride] = {}
    for ref, table in ov.items():
        key = f'prices.overrides."{ref}"'
        if ":" not in ref or ref.split(":", 1)[0] not in BUILTIN_PROVIDERS:
            raise ConfigError(f"{key}: name it \"provider:model\", e.g. \"openai:gpt-4o\"")
        overrides[ref] = _price_table(table, key)
    return PriceSettings(overrides, unknown_model, fallback)


def _price_table(table: Any, key: str) -> PriceOverride:
    if not isinstance(table, dict):
        raise ConfigError(f"{key} must be a table like {{ input = 2.5, output = 10.0 }} (USD per million tokens)")
    try:
        return PriceOverride.parse(table)
    except ValueError as e:
        raise ConfigError(f"{key}: {e} (known: {_PRICE_KEYS})") from None


_ENDPOINT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def _unmetered(value: Any) -> tuple[str, ...]:
    """Names as the refusal message gives them: "batches", "fine_tuning", "realtime", "threads", …"""
    if not isinstance(value, list) or not all(isinstance(x, str) and _ENDPOINT_NAME.fullmatch(x) for x in value):
        raise ConfigError('budgets.allow_unmetered must be a list of endpoint names such as "batches" or '
                          f'"fine_tuning" (the refusal names the endpoint; got {value!r})')
    return tuple(value)


