"""`spendgate doctor`: each check says what is wrong and what to do."""

from __future__ import annotations

import http.client
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from spendgate.cli.common import safe_url
from spendgate.cli.onboarding import ca_cert_path
from spendgate.providers.tokens import available_encodings, encoding_files
from spendgate.settings import HostPort, ProviderSettings, Settings
from spendgate.store import Database, sqlite_path


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str


def run_checks(settings: Settings) -> list[Check]:
    out = [Check("config", "OK", str(settings.config_path.resolve()) if settings.config_path else
                 "built-in defaults (no --config, $SPENDGATE_CONFIG or ./spendgate.toml)")]
    out.append(_database(settings))
    for p in settings.providers:
        if p.api_key or p.configured:
            out.append(_upstream_key(p))
    out.append(_tokenizer())
    out.append(_ca(settings))
    out.extend(_gateway(settings))
    return out


def _upstream_key(p: ProviderSettings) -> Check:
    """Names the variable the config reads (`api_key = "env:NAME"`, else the provider's usual one)."""
    src = p.api_key_source or f"env:{p.spec.default_key_env}"
    var = src[4:] if src.startswith("env:") else None
    if p.api_key:
        return Check(f"upstream key {p.name}", "OK", f"set from ${var}" if var else "set in the config file")
    return Check(f"upstream key {p.name}", "WARN",
                 f"${var} is not set (providers.{p.name}.api_key reads it): export {var} where the gateway runs, "
                 f"or point providers.{p.name}.api_key at another variable; requests to {p.name} get 503")


def _database(settings: Settings) -> Check:
    url = settings.database.url
    path = sqlite_path(url)
    where = str(path) if path is not None else safe_url(url)
    if path is not None and not path.exists():  # opening it would create an empty file: say so instead
        return Check("database", "FAIL", f"no database file at {where}: run `spendgate db upgrade` with this config "
                                         "(or start `spendgate serve`), or fix database.url")
    db = Database(url)
    try:
        db.ping()
        cur, head = db.current_revision(), db.head_revision()
    except Exception as e:
        return Check("database", "FAIL",
                     f"cannot open {where} ({type(e).__name__}); check database.url and that the server runs")
    finally:
        db.close()
    if cur != head:
        return Check("database", "WARN", f"{where}: schema {cur or 'empty'}, needs {head}: run `spendgate db upgrade` "
                                         "(serve does it on an empty database)")
    return Check("database", "OK", f"{where} (schema {cur})")


def _tokenizer() -> Check:
    found = available_encodings()
    files = encoding_files()
    where = os.path.dirname(next(iter(files.values()))[1]) or "(caching disabled)"
    missing = [f"{name} (fetch {url} to {path})" for name, (url, path) in files.items() if name not in found]
    if not found:
        return Check("tokenizer", "WARN", f"no tiktoken encoding loadable from {where}; token estimates fall back "
                                          f"to bytes/4. Missing: {'; '.join(missing)}")
    extra = f"; missing {'; '.join(missing)}" if missing else ""
    return Check("tokenizer", "OK", f"{', '.join(found)} from {where}{extra}")


def _ca(settings: Settings) -> Check:
    path: Path = ca_cert_path(settings)
    if not path.exists():
        return Check("ca", "WARN", f"{path} does not exist yet: `spendgate ca` or the first `serve` creates it")
    return Check("ca", "OK", str(path))


def _local(address: HostPort) -> tuple[str, int]:
    """Where to reach a listen address from this machine ("0.0.0.0" listens on loopback too)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
    return host, address.port


PROBE_HOST = "spendgate-doctor.invalid:443"  # in the gateway's log as the refused CONNECT this check makes


def _gateway(settings: Settings) -> list[Check]:
    """Whether a gateway with this config is running: its proxy answers a CONNECT without credentials
    as Spendgate does (407, with a request id), and its metrics endpoint serves Spendgate's metrics."""
    proxy, metrics = settings.proxy.listen, settings.metrics.listen
    start = "start it with `spendgate serve` and this config"
    try:
        head = _connect_probe(_local(proxy))
    except OSError as e:
        proxy_check = Check("gateway proxy", "WARN", f"nothing answers on {proxy} ({e.strerror or e}): {start}")
    else:
        if head.startswith(b"HTTP/1.1 407") and b"\nx-spendgate-request-id:" in head.lower():
            proxy_check = Check("gateway proxy", "OK", f"Spendgate answers on {proxy}")
        else:
            proxy_check = Check("gateway proxy", "WARN", f"something other than Spendgate answers on {proxy}: "
                                                         "stop it or change proxy.listen")
    host, port = _local(metrics)
    conn = http.client.HTTPConnection(host, port, timeout=3)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        body = r.read(1 << 20)
    except OSError as e:
        return [proxy_check, Check("gateway metrics", "WARN", f"nothing answers on http://{metrics}/metrics "
                                                              f"({e.strerror or e}): {start}")]
    finally:
        conn.close()
    if r.status != 200 or b"spendgate_" not in body:
        return [proxy_check, Check("gateway metrics", "WARN",
                                   f"http://{metrics}/metrics answers {r.status} without Spendgate's metrics: another "
                                   "program holds the port; stop it or change metrics.listen")]
    return [proxy_check, Check("gateway metrics", "OK", f"Spendgate's metrics on http://{metrics}/metrics")]


def _connect_probe(address: tuple[str, int]) -> bytes:
    """The answer's head to a CONNECT without proxy credentials (a gateway refuses it, logging why)."""
    with socket.create_connection(address, timeout=3) as sock:
        sock.sendall(f"CONNECT {PROBE_HOST} HTTP/1.1\r\nHost: {PROBE_HOST}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return head
