"""The vocabulary of config values: each reader checks one kind of value and raises
`ConfigError` naming the key and the fix. Used by `spendgate.settings` only."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from spendgate.access import parse_destination
from spendgate.money import parse_amount


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Upstream:
    scheme: str
    host: str
    port: int


def known(table: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{prefix}{k}: unknown setting; known here: {', '.join(sorted(allowed))}")


def table(raw: Mapping[str, Any], name: str, prefix: str = "") -> Mapping[str, Any]:
    v = raw.get(name, {})
    if not isinstance(v, dict):
        raise ConfigError(f"{prefix}{name} must be a table, e.g. [{prefix}{name}]")
    return v


def env_ref(value: str, key: str, env: Mapping[str, str], required: bool = True) -> str | None:
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


def str_value(v: Any, key: str, env: Mapping[str, str]) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key} must be a non-empty string")
    out = env_ref(v, key, env)
    assert out is not None
    return out


def optional_str(v: Any, key: str, env: Mapping[str, str]) -> str | None:
    if v is None:
        return None
    return str_value(v, key, env)


def optional_secret(v: Any, key: str, env: Mapping[str, str]) -> str | None:
    """Like `optional_str`, but an unset env var means "not configured" (`doctor` reports it)."""
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key} must be a string, e.g. \"env:NAME\"")
    return env_ref(v, key, env, required=False)


def bool_value(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false (got {v!r})")
    return v


def posint(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{key} must be a positive whole number (got {v!r})")
    return v


def posfloat(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ConfigError(f"{key} must be a positive number (got {v!r})")
    return float(v)


def usd_amount(v: Any, key: str) -> Decimal:
    try:
        return parse_amount(v)
    except ValueError:
        raise ConfigError(f"{key} must be a non-negative amount in USD, e.g. 100 (got {v!r})") from None


def ports(v: Any, key: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in v):
        raise ConfigError(f"{key} must be a list of port numbers, e.g. [443] (got {v!r})")
    return tuple(sorted(set(v)))


def destinations(v: Any, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(d, str) and d for d in v):
        raise ConfigError(f"{key} must be a list like [\"10.1.2.0/24\", \"git.internal:443\"] (got {v!r})")
    for d in v:
        try:
            parse_destination(d)
        except ValueError as e:
            raise ConfigError(f"{key}: {d!r} is not a network, host:port or ip:port ({e})") from None
    return tuple(v)


def hostport(v: Any, key: str) -> HostPort:
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


def upstream(v: Any, key: str) -> Upstream:
    if not isinstance(v, str):
        raise ConfigError(f"{key} must be a URL like \"https://127.0.0.1:9443\"")
    u = urlsplit(v)
    if u.scheme not in ("https", "http") or not u.hostname:
        raise ConfigError(f"{key} must be a URL like \"https://127.0.0.1:9443\" (got {v!r})")
    if u.path not in ("", "/"):
        raise ConfigError(f"{key}: a path is not supported, give scheme://host:port only")
    return Upstream(u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80))


def public_url(v: Any, key: str, env: Mapping[str, str]) -> str | None:
    """`[proxy] public_url`: how developers reach the proxy, as `http://HOST:PORT` (normalised)."""
    if v is None:
        return None
    text = str_value(v, key, env)
    u = urlsplit(text)
    if u.scheme != "http" or not u.hostname:
        raise ConfigError(f"{key} must be the proxy's address as developers reach it, e.g. "
                          f"\"http://gateway.internal:8080\" (plain http: the proxy itself speaks HTTP; got {text!r})")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise ConfigError(f"{key}: give scheme://host:port only, without path, query or credentials (got {text!r})")
    try:
        port = u.port or 80
    except ValueError:
        raise ConfigError(f"{key}: the port is not a number 1-65535 (got {text!r})") from None
    host = u.hostname.lower()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def database_url(url: str, cfg_path: Path | None) -> str:
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
