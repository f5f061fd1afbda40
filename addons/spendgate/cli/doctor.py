"""`spendgate doctor`: each check says what is wrong and what to do."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from spendgate.cli.onboarding import ca_cert_path
from spendgate.providers.tokens import encoding_for
from spendgate.settings import Settings
from spendgate.store import Database


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str


def run_checks(settings: Settings) -> list[Check]:
    out = [Check("config", "OK", str(settings.config_path) if settings.config_path else "built-in defaults")]
    out.append(_database(settings))
    for p in settings.providers:
        if p.api_key:
            out.append(Check(f"upstream key {p.name}", "OK", f"set ({p.api_key_source})"))
        elif p.configured:
            out.append(Check(f"upstream key {p.name}", "WARN",
                             f"not set: export {p.spec.default_key_env} or set providers.{p.name}.api_key; "
                             f"requests to {p.name} get 503"))
    out.append(_tokenizer())
    out.append(_ca(settings))
    return out


def _database(settings: Settings) -> Check:
    try:
        db = Database(settings.database.url)
        db.ping()
        cur, head = db.current_revision(), db.head_revision()
    except Exception as e:
        return Check("database", "FAIL",
                     f"cannot connect ({type(e).__name__}); check database.url and that the server runs")
    if cur != head:
        return Check("database", "WARN", f"schema {cur or 'empty'}, needs {head}: run `spendgate db upgrade` "
                                         "(serve does it on an empty database)")
    return Check("database", "OK", f"schema {cur}")


def _tokenizer() -> Check:
    enc = encoding_for("gpt-4o")
    if enc is None:
        where = os.environ.get("TIKTOKEN_CACHE_DIR", "(TIKTOKEN_CACHE_DIR unset)")
        return Check("tokenizer", "WARN",
                     f"no tiktoken encoding loadable from {where}; token estimates fall back to bytes/4")
    return Check("tokenizer", "OK", "tiktoken encodings available")


def _ca(settings: Settings) -> Check:
    path: Path = ca_cert_path(settings)
    if not path.exists():
        return Check("ca", "WARN", f"{path} does not exist yet: `spendgate ca` or the first `serve` creates it")
    return Check("ca", "OK", str(path))
